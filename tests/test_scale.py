"""preprocessing_at_scale at a tiny size: every stage runs from scratch and the figures add up."""
import json

import numpy as np
import pytest

from unetpp_lib import scale
from unetpp_lib.core import io
from unetpp_lib.core.layout import PreLayout, RawLayout

SHAPE, SPACING = (24, 48, 48), (1.0, 0.77, 0.77)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    return work, scale.preprocessing_at_scale(work, 2, SHAPE, SPACING, thick_case=True, num_workers=2, seed=3)


def test_cases_have_the_asked_geometry(measured):
    work, r = measured
    assert r["cases"] == 2 and r["case_shapes"] == [[24, 48, 48], [5, 48, 48]]
    img, g = io.read_image(work / "msd" / "imagesTr" / "liver_0.nii.gz")
    assert g.shape == SHAPE and np.allclose(g.spacing, SPACING) and img.dtype == np.int16
    assert io.read_image(work / "msd" / "imagesTr" / "liver_1.nii.gz")[1].spacing[0] == pytest.approx(5.0)
    assert r["n_voxels"] == 24 * 48 * 48 + 5 * 48 * 48


def test_every_stage_ran_and_wrote(measured):
    work, r = measured
    raw, pre = RawLayout(work / "raw"), PreLayout(work / "preprocessed")
    for case in ("liver_0", "liver_1"):
        assert io.read_image(raw.image(case))[1].shape[1:] == (48, 48)
        assert io.read_image(raw.label(case))[0].dtype == np.uint8
    assert sorted(io.read_json(pre.fingerprint)["cases"]) == ["liver_0", "liver_1"]
    assert io.read_json(pre.manifest)["num_cases"] == 2
    assert set(r["stages"]) == {"convert_s", "plan_s", "preprocess_s"} and all(v > 0 for v in r["stages"].values())
    assert r["chain_s"] == pytest.approx(sum(r["stages"].values()), abs=0.01)
    assert r["one_read_s"] > 0 and r["ratio"] == pytest.approx(r["chain_s"] / r["one_read_s"], rel=0.01, abs=0.01)
    assert r["one_read_kit_s"] > 0 and r["ratio_kit"] == pytest.approx(r["chain_s"] / r["one_read_kit_s"], rel=0.01, abs=0.01)


def test_store_bytes_and_disk_are_what_is_on_disk(measured):
    work, r = measured
    pre = PreLayout(work / "preprocessed")
    on_disk = sum(f.stat().st_size for c in ("liver_0", "liver_1") for f in pre.case_store(c).rglob("*") if f.is_file())
    assert r["store_bytes"] == on_disk > 0
    assert r["bytes_per_voxel"] == pytest.approx(on_disk / r["n_voxels_preprocessed"], abs=1e-3)
    assert set(r["disk_mb"]) == {"msd", "raw", "preprocessed", "store"}
    assert r["disk_mb"]["preprocessed"] >= r["disk_mb"]["store"] > 0
    assert r["peak_rss_mb"]["preprocess"]["reported"] > 0 and r["peak_rss_mb"]["convert"]["main"] > 0
    # workers are sampled every 0.05 s: a tiny stage may end before the first look (None), never a wrong figure
    assert r["peak_rss_mb"]["convert"]["worker"] is None or r["peak_rss_mb"]["convert"]["worker"] > 0
    assert json.loads((work / "scale.json").read_text()) == r
    rows = scale.scale_table(r)
    assert rows[0]["measurement"].startswith("cases") and any("ratio" in x["measurement"] for x in rows)


def test_a_second_run_reuses_the_cases_and_redoes_the_stages(measured):
    work, first = measured
    again = scale.preprocessing_at_scale(work, 2, SHAPE, SPACING, thick_case=True, num_workers=2, seed=3)
    assert again["synth_reused"] and not first["synth_reused"]
    assert again["n_voxels_preprocessed"] == first["n_voxels_preprocessed"]
    assert again["stages"]["preprocess_s"] > 0  # not skipped as done


def test_cli_prints_the_json(tmp_path, capsys):
    out = scale.main(["--out", str(tmp_path), "--cases", "1", "--shape", "16", "32", "32", "--no-thick", "--workers", "1"])
    assert json.loads(capsys.readouterr().out) == out and out["cases"] == 1 and out["case_shapes"] == [[16, 32, 32]]
