"""The one currency rule (currency.py) and what uses it: convert's case stamps, the fingerprint gathered
by convert, preprocessing's case stamps and the store's manifest."""
import json
import os

import numpy as np
import pytest

from unetpp_lib import convert, plan, preprocess
from unetpp_lib.core import currency
from unetpp_lib.core.io import discard
from unetpp_lib.core.layout import PreLayout, RawLayout
from unetpp_lib.prep.store import StalePreprocessedError, check_preprocessed


def test_key_changes_when_an_input_file_is_rewritten(tmp_path):
    f = tmp_path / "a.nii.gz"
    f.write_bytes(b"abc")
    key = currency.work_key({"image": f}, {"step": 0.5}, "x-1")
    assert currency.work_key({"image": f}, {"step": 0.5}, "x-1") == key
    os.utime(f, ns=(1, 1))
    assert currency.work_key({"image": f}, {"step": 0.5}, "x-1") != key
    assert currency.work_key({"image": f}, {"step": 0.25}, "x-1") != currency.work_key({"image": f}, {"step": 0.5}, "x-1")
    assert currency.work_key({"image": f}, code="x-2") != currency.work_key({"image": f}, code="x-1")


def test_is_current_needs_the_same_key_and_every_output(tmp_path):
    stamp, out = tmp_path / "case.json", tmp_path / "case.zarr"
    key = {"params": {"plans_hash": "abc"}}
    assert not currency.is_current(stamp, key)  # no stamp
    currency.mark(stamp, key, shape=[2, 3])
    assert currency.is_current(stamp, key) and not currency.is_current(stamp, key, [out])
    out.mkdir()
    assert currency.is_current(stamp, key, [out]) and not currency.is_current(stamp, {"params": {}}, [out])
    stamp.write_text("{not json")  # damaged: not current, no crash
    assert not currency.is_current(stamp, key, [out])


def test_renew_keeps_outputs_only_under_the_same_key(tmp_path):
    out = tmp_path / "a.nii.gz"
    out.write_text("x")
    stamp = tmp_path / "settings.json"
    assert currency.renew(stamp, {"step": 0.5}, lambda: discard([out])) and out.is_file()  # nothing recorded yet
    assert currency.renew(stamp, {"step": 0.5}, lambda: discard([out])) and out.is_file()
    assert not currency.renew(stamp, {"step": 0.25}, lambda: discard([out, tmp_path / "gone"])) and not out.exists()
    assert json.loads(stamp.read_text()) == {"key": {"step": 0.25}}


def test_convert_gathers_the_fingerprint_a_separate_pass_gives(synth_task, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    convert.convert_task(synth_task, raw, num_workers=1).raise_for_problems()
    separate = {}
    names = sorted(json.loads(RawLayout(raw).report.read_text())["cases"], key=lambda r: r["case"])
    train = [r["case"] for r in names if r["split"] == "training"]
    for case in train:
        job = {"case": case, "image": str(RawLayout(raw).image(case)), "label": str(RawLayout(raw).label(case))}
        separate[case] = plan.fingerprint_case(job)
    read_images = []
    monkeypatch.setattr(plan, "fingerprint_case", lambda job: read_images.append(job) or separate[job["case"]])
    fp = plan.compute_fingerprint(raw)
    assert read_images == []  # planning read no image: convert gathered it all
    for case in train:
        want = {k: v for k, v in separate[case].items() if k not in ("case", "samples")}
        assert fp["cases"][case] == json.loads(json.dumps(want))
    samples = np.concatenate([separate[c]["samples"] for c in fp["cases"]])  # dataset.json order, as planned
    assert fp["foreground_intensity"] == plan.intensity_stats(samples)
    # a raw file rewritten after conversion is read again, not taken from the stale record
    label = RawLayout(raw).label(train[0])
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    plan.compute_fingerprint(raw)
    assert [j["case"] for j in read_images] == [train[0]]


def test_preprocess_redoes_a_case_whose_raw_file_changed_and_the_manifest_guards_the_store(synth_task, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    convert.convert_task(synth_task, raw).raise_for_problems()
    plan.plan_task(raw, pre)
    first = {r["case"]: r["status"] for r in preprocess.preprocess_task(raw, pre)}
    assert set(first.values()) == {"preprocessed"}
    case = sorted(first)[0]
    image = RawLayout(raw).image(case)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    again = {r["case"]: r["status"] for r in preprocess.preprocess_task(raw, pre)}
    assert again[case] == "preprocessed" and {s for c, s in again.items() if c != case} == {"skipped"}
    check_preprocessed(pre)
    plans = json.loads(PreLayout(pre).plans.read_text())
    plans["target_spacing"] = [s * 1.5 for s in plans["target_spacing"]]
    PreLayout(pre).plans.write_text(json.dumps(plans))
    with pytest.raises(StalePreprocessedError, match="Run 03_preprocess again"):
        check_preprocessed(pre)
