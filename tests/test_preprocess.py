import json

import numpy as np
import pytest

from unetpp_lib import convert, plan, preprocess
from unetpp_lib.core import io
from unetpp_lib.prep import store
from unetpp_lib.prep.store import StalePreprocessedError


@pytest.fixture
def planned(synth_task, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    convert.convert_task(synth_task, raw)
    plan.plan_task(raw, pre)
    return raw, pre


def test_preprocess_writes_store_properties_and_manifest(planned):
    raw, pre = planned
    records = preprocess.preprocess_task(raw, pre, num_workers=2)
    plans = json.loads((pre / "plans.json").read_text())
    lo, hi = [(v - plans["normalization"]["mean"]) / plans["normalization"]["std"]
              for v in plans["normalization"]["clip"]]
    manifest = store.check_preprocessed(pre)
    assert manifest["num_cases"] == len(records) == 5 and manifest["plans_hash"] == plans["preprocessing_hash"]
    for r in records:
        g = store.open_case(pre / "3d_fullres" / f"{r['case']}.zarr")
        img, lab = g["image"][...].astype(np.float32), g["label"][...]
        assert list(img.shape) == r["shape_after_resampling"] == list(lab.shape)
        assert img.min() >= lo - 0.01 and img.max() <= hi + 0.01  # clipped to the foreground percentiles
        assert img.min() == pytest.approx(lo, abs=0.01)  # air sits at the lower clip
        props = store.case_properties(pre, r["case"])
        src = io.read_image(raw / "imagesTr" / f"{r['case']}_0000.nii.gz")[1]
        assert props["geometry"] == src  # the original geometry, for exporting predictions
        raw_lab = io.read_image(raw / "labelsTr" / f"{r['case']}.nii.gz")[0]
        assert set(np.unique(lab)) == set(np.unique(raw_lab))  # every class survives resampling
        for cls, pts in store.class_locations(g).items():
            assert (lab[tuple(pts.T)] == cls).all()


def test_normalisation_is_the_ct_scheme_exactly(planned):
    """With no resampling to do, stored voxels are (clip(HU, p0.5, p99.5) - mean) / std."""
    raw, pre = planned
    img, geom = io.read_image(raw / "imagesTr" / "liver_0_0000.nii.gz")
    plan.plan_task(raw, pre, overrides={"target_spacing": list(geom.spacing)})
    preprocess.preprocess_task(raw, pre, cases=["liver_0"])
    norm = json.loads((pre / "plans.json").read_text())["normalization"]
    expected = (np.clip(img.astype(np.float64), *norm["clip"]) - norm["mean"]) / norm["std"]
    stored = store.open_case(pre / "3d_fullres" / "liver_0.zarr")["image"][...].astype(np.float64)
    np.testing.assert_allclose(stored, expected, atol=4e-3)  # float16 storage


def test_resume_after_a_crash(planned, monkeypatch):
    raw, pre = planned
    real = store.write_case

    def crash_on_liver_2(path, *args, **kwargs):
        if "liver_2" in str(path):
            (path.parent / "liver_2.partial.zarr").mkdir()  # what a killed writer leaves
            raise MemoryError("simulated crash")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(preprocess, "write_case", crash_on_liver_2)
    with pytest.raises(MemoryError):
        preprocess.preprocess_task(raw, pre)
    out = pre / "3d_fullres"
    assert not (out / "liver_2.json").exists() and not (out / "manifest.json").exists()
    assert (out / "liver_0.json").exists()
    monkeypatch.setattr(preprocess, "write_case", real)
    records = preprocess.preprocess_task(raw, pre)
    status = {r["case"]: r["status"] for r in records}
    assert status["liver_0"] == "skipped" and status["liver_2"] == "preprocessed"
    assert not list(out.glob("*.partial*")) and (out / "manifest.json").exists()


def test_stale_store_is_refused_with_the_fix(planned):
    raw, pre = planned
    with pytest.raises(StalePreprocessedError, match="run 03_preprocess"):
        store.check_preprocessed(pre)
    preprocess.preprocess_task(raw, pre)
    store.check_preprocessed(pre)
    plans = json.loads((pre / "plans.json").read_text())
    plans["target_spacing"] = [s * 1.5 for s in plans["target_spacing"]]  # replanned after preprocessing
    (pre / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(StalePreprocessedError, match="plans changed after preprocessing.*Run 03_preprocess again"):
        store.check_preprocessed(pre)


def test_changed_plans_redo_cases(planned):
    raw, pre = planned
    preprocess.preprocess_task(raw, pre)
    plan.plan_task(raw, pre, overrides={"target_spacing": [3.0, 1.5, 1.5]})
    records = preprocess.preprocess_task(raw, pre)
    assert {r["status"] for r in records} == {"preprocessed"}
    assert store.check_preprocessed(pre)["plans_hash"] == json.loads((pre / "plans.json").read_text())["preprocessing_hash"]


def test_worker_count_adapts_to_memory():
    gib = 2**30
    big = 400_000_000  # a ~400 M voxel case needs ~11 GB of working memory
    assert preprocess.worker_count(8, big, available_bytes=24 * gib) == 1
    assert preprocess.worker_count(8, big, available_bytes=128 * gib) == 8
    assert preprocess.worker_count(4, big, available_bytes=1 * gib) == 1  # never zero


def test_preprocess_case_arrays_shapes():
    img = np.full((10, 20, 20), -1000, np.int16)
    img[1:9, 2:18, 2:18] = 100
    lab = np.zeros_like(img, dtype=np.uint8)
    lab[3:7, 6:14, 6:14] = 1
    plans = {"transpose_forward": [0, 1, 2], "target_spacing": [2.0, 1.0, 1.0],
             "normalization": {"clip": [0.0, 150.0], "mean": 100.0, "std": 10.0},
             "resampling": {"image_order": 3, "label_order": 1}}
    out, out_lab, props = preprocess.preprocess_arrays(img, lab, (4.0, 0.5, 0.5), plans)
    assert out.shape == out_lab.shape == (20, 10, 10) and props["shape_after_resampling"] == [20, 10, 10]
    assert out.min() == pytest.approx(-10.0) and np.median(out[out_lab == 1]) == pytest.approx(0.0, abs=0.2)


def test_unreadable_raw_case_names_the_case(planned):
    raw, pre = planned
    (raw / "imagesTr" / "liver_1_0000.nii.gz").write_bytes(b"broken")
    with pytest.raises(RuntimeError, match="liver_1: preprocessing .*liver_1_0000.nii.gz failed.*01_convert"):
        preprocess.preprocess_task(raw, pre)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_preprocess_arrays_leaves_its_input_alone_and_matches_float32_then_float16(dtype):
    """The slab-wise normalisation gives the values of normalising a float32 copy, in float32 and in float16,
    and never writes into the caller's image (a float32 CT at the target spacing is not copied first)."""
    from unetpp_lib.prep.transforms import normalize_ct, preprocess_arrays

    rng = np.random.default_rng(0)
    img = rng.integers(-1000, 1500, (9, 20, 22)).astype(dtype)
    before = img.copy()
    plans = {"transpose_forward": [0, 1, 2], "target_spacing": [1.0, 0.8, 0.8],
             "resampling": {"image_order": 3, "label_order": 1},
             "normalization": {"clip": [-100.0, 240.0], "mean": 99.5, "std": 37.25}}
    ref = normalize_ct(img.astype(np.float32), plans["normalization"])
    out32, _, _ = preprocess_arrays(img, None, (1.0, 0.8, 0.8), plans)
    out16, _, _ = preprocess_arrays(img, None, (1.0, 0.8, 0.8), plans, dtype=np.float16)
    assert np.array_equal(img, before)
    assert out32.dtype == np.float32 and np.array_equal(out32, ref)
    assert out16.dtype == np.float16 and np.array_equal(out16, ref.astype(np.float16))
