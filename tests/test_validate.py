import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import mean_dice_by_hand, prepared_run
from unetpp_lib import validate
from unetpp_lib.core import io
from unetpp_lib.qa import plots
from unetpp_lib.nn.infer import InferenceSettings
from unetpp_lib.train import TrainConfig, train

CPU = InferenceSettings(device="cpu", mirror_axes=())  # quick: no test-time mirroring


@pytest.fixture(scope="module")
def trained(synth_task, tmp_path_factory):
    run = prepared_run(tmp_path_factory.mktemp("val"), synth_task, {"patch_size": [16, 32, 32], "base_num_features": 4})
    train(TrainConfig(str(run), fold=0, num_epochs=2, iterations_per_epoch=3, val_iterations=1,
                      num_workers=0, device="cpu"))
    return run


def test_validate_fold_writes_nnunet_summary(trained):
    validate.validate_fold(trained, 0, InferenceSettings("final", "cpu", mirror_axes=(2,)))
    out = trained / "fold_0" / "validation"
    summary = json.loads((out / "summary.json").read_text())
    # v1's keys, and the lesion findings added beside them
    assert set(summary) == {"author", "description", "id", "name", "results", "task", "timestamp", "lesions"}
    liver_dice = summary["results"]["mean"]["1"]["Dice"]  # what get_dice_result.py reads
    # equal to Dice recomputed from the written prediction and label files, and to the per-case CSV
    assert liver_dice == pytest.approx(mean_dice_by_hand(summary, 1), abs=1e-9)
    cases = json.loads((trained / "preprocessed" / "splits.json").read_text())[0]["val"]
    assert len(summary["results"]["all"]) == len(cases)
    first = summary["results"]["all"][0]
    assert set(first) == {"0", "1", "2", "reference", "test"} and first["test"].endswith(f"{cases[0]}.nii.gz")
    assert {"Dice", "Jaccard", "Hausdorff Distance 95", "Surface Dice", "True Negative Rate"} <= set(first["1"])
    found = summary["lesions"]
    assert found["connectivity"] == 6 and [c["case"] for c in found["per_case"]] == cases
    for entry, c in zip(summary["results"]["all"], found["per_case"]):  # lesion voxels add up to the tumour's
        assert sum(r["voxels"] for r in c["reference"]) == entry["2"]["Total Positives Reference"]
        assert sum(q["voxels"] for q in c["predicted"]) == entry["2"]["Total Positives Test"]
    assert found["overall"]["counts"]["reference"] == sum(len(c["reference"]) for c in found["per_case"])
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [r["case"] for r in rows] == cases and "Dice 1" in rows[0]
    csv_dice = [float(r["Dice 1"]) for r in rows]
    assert csv_dice == pytest.approx([c["1"]["Dice"] for c in summary["results"]["all"]], nan_ok=True)
    pp = json.loads((out / "postprocessing.json").read_text())
    assert set(pp) >= {"lcc_all_foreground", "lcc_classes", "dice_before", "dice_after"}
    assert np.nanmean(list(pp["dice_after"].values())) >= np.nanmean(list(pp["dice_before"].values()))
    for c in cases:
        seg, g = io.read_image(out / f"{c}.nii.gz")
        assert io.same_geometry(g, io.read_image(trained / "raw" / "imagesTr" / f"{c}_0000.nii.gz")[1])
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(cases) and all(t["network"] > 0 and t["tiles"] > 0 for t in timings.values())


def test_qa_gallery_and_test_set(trained):
    rows = plots.qa_gallery(trained, 0)
    assert rows and all(os.path.isfile(r["png"]) for r in rows)
    assert (trained / "fold_0" / "validation" / "gallery.png").is_file()
    dice = [r["tumour_dice"] for r in rows if not np.isnan(r["tumour_dice"])]
    assert dice == sorted(dice)  # worst first
    records = validate.predict_test_set(trained, 0, CPU)
    assert len(records) == 2
    for r in records:
        seg, g = io.read_image(r["prediction"])
        assert io.same_geometry(g, io.read_image(r["image"])[1]) and seg.dtype == np.uint8 and r["network"] > 0


def test_postprocessing_decision_on_known_masks(tmp_path):
    ref = np.zeros((8, 20, 20), np.uint8)
    ref[2:6, 4:14, 4:14] = 1
    pred = ref.copy()
    pred[0, 18, 18] = 1  # a stray false positive island: removing it helps
    g = io.Geometry(ref.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    io.write_image(tmp_path / "raw" / "labelsTr" / "a.nii.gz", ref, g)
    io.write_image(tmp_path / "pred" / "a.nii.gz", pred, g)
    d = validate.decide_postprocessing(tmp_path / "pred", tmp_path / "raw", ["a"], [1, 2])
    assert d["lcc_all_foreground"] is True and d["dice_after"]["1"] == 1.0 > d["dice_before"]["1"]
    io.write_image(tmp_path / "pred" / "a.nii.gz", ref, g)  # nothing to gain: nothing applied
    d = validate.decide_postprocessing(tmp_path / "pred", tmp_path / "raw", ["a"], [1, 2])
    assert d["lcc_all_foreground"] is False and d["lcc_classes"] == []


@pytest.mark.slow
def test_killed_validation_resumes(trained):
    code = ("import sys\nfrom unetpp_lib import validate\nfrom unetpp_lib.nn import infer\n"
            "real = infer.export\n"
            "def slow(*a, **k):\n    r = real(*a, **k)\n    import time; time.sleep(30)\n    return r\n"
            "validate.export = slow\n"
            f"validate.predict_validation({str(trained)!r}, 0, infer.InferenceSettings(device='cpu', mirror_axes=()))\n")
    val = trained / "fold_0" / "validation"
    if val.exists():
        import shutil
        shutil.rmtree(val)
    splits_path = trained / "preprocessed" / "splits.json"
    splits = json.loads(splits_path.read_text())
    splits[0]["val"] = ["liver_0", "liver_1", "liver_2"]  # more cases than the 1 of a 5-case fold
    splits_path.write_text(json.dumps(splits))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(val.glob("*.nii.gz")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(val.glob("*.nii.gz"))
    assert len(first) == 1 and not list(val.glob("*.partial*"))
    stamp = first[0].stat().st_mtime_ns
    timings = validate.predict_validation(trained, 0, CPU)
    cases = json.loads((trained / "preprocessed" / "splits.json").read_text())[0]["val"]
    assert sorted(timings) == sorted(cases) == ["liver_0", "liver_1", "liver_2"]
    assert first[0].stat().st_mtime_ns == stamp  # not redone
    assert len(list(val.glob("*.nii.gz"))) == 3


def test_ensemble_of_folds_averages_probabilities(trained, tmp_path):
    from unetpp_lib.nn.infer import predict

    image = sorted((trained / "raw" / "imagesTs").glob("*_0000.nii.gz"))[:1]
    fold = trained / "fold_0"
    one = predict(image, [fold], tmp_path / "one", CPU)
    two = predict(image, [fold, fold], tmp_path / "two", InferenceSettings(device="cpu", mirror_axes=(), save_probabilities=True))
    a, b = io.read_image(one[0]["prediction"])[0], io.read_image(two[0]["prediction"])[0]
    assert np.array_equal(a, b)  # the mean of identical members is the member
    probs = np.load(tmp_path / "two" / (image[0].name.replace("_0000.nii.gz", ".npz")))["probabilities"]
    assert probs.dtype == np.float16 and probs.shape[0] == 3 and np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)


def test_a_fold_made_for_other_plans_is_refused_by_name(trained, tmp_path):
    """A fold whose model was made for other plans (e.g. imported from v1) is not run on this store's cases."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("validation", "test_*"))
    side = run / "fold_0" / "checkpoint_final.json"
    meta = json.loads(side.read_text())
    meta["plans_hash"] = "0" * len(meta["plans_hash"])
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="made for plans 0+, but .*plans.json.*03_preprocess"):
        validate.predict_validation(run, 0, CPU)
    assert not (run / "fold_0" / "validation").exists() or not list((run / "fold_0" / "validation").glob("*.nii.gz"))


def test_holdout_scans_are_predicted_and_scored_with_invented_volume(trained, tmp_path):
    from unetpp_lib.prep import synthetic

    task = synthetic.make_holdout(trained / "msd_holdout", 2, 1.6, (12, 32, 32), seed=7,
                                  inplane_range=(0.6, 0.9), z_range=(0.7, 5.0))
    lengths = [c["length_mm"] for c in json.loads((task / "synthetic_cases.json").read_text())]
    assert len(lengths) == 2
    found = validate.validate_holdout(trained, 0, CPU)
    summary, out = found["summary"], trained / "fold_0" / "holdout"
    assert [c["test"] for c in summary["results"]["all"]] == [str(out / f"liver_{i}.nii.gz") for i in range(2)]
    for i in range(2):
        seg, g = io.read_image(out / f"liver_{i}.nii.gz")
        assert io.same_geometry(g, io.read_image(task / "imagesTr" / f"liver_{i}.nii.gz")[1])
        entry = summary["results"]["all"][i]["1"]
        assert entry["Invented Volume ml"] >= 0 and np.isfinite(entry["Invented Volume %"])
    assert "Invented Volume % 1" in open(out / "per_case.csv").readline()
    decided = (trained / "fold_0" / "validation" / "postprocessing.json").is_file()
    assert (found["summary_postprocessed"] is not None) == decided  # post-processed as the fold's test predictions
    if decided:
        assert (trained / "fold_0" / "holdout_postprocessed" / "liver_1.nii.gz").is_file()
    before = (out / "liver_0.nii.gz").stat().st_mtime_ns
    validate.validate_holdout(trained, 0, CPU)  # done with the same settings: scored again, not predicted again
    assert (out / "liver_0.nii.gz").stat().st_mtime_ns == before
    assert validate.validate_holdout(tmp_path, 0, CPU) is None  # a run without held-out scans


def test_uncertainty_maps_are_written_scored_and_pooled(trained, tmp_path):
    """Issue 24: validation, post-processed, test and ensemble predictions carry the maps with exact geometry;
    summary.json the case scores, lesion confidences and error-detection figures; the cross-validation pools them."""
    import shutil

    from unetpp_lib.core.layout import UNCERTAINTY_KINDS, PredLayout
    from unetpp_lib.evaluation import crossval

    run = Path(shutil.copytree(trained, tmp_path / "run"))
    for stale in ("validation", "validation_postprocessed", "test_predictions"):
        shutil.rmtree(run / "fold_0" / stale, ignore_errors=True)
    s = InferenceSettings("final", "cpu", mirror_axes=(2,), save_uncertainty=True)
    res = validate.validate_fold(run, 0, s)
    cases = json.loads((run / "preprocessed" / "splits.json").read_text())[0]["val"]
    for folder in ("validation", "validation_postprocessed"):
        out = PredLayout(run / "fold_0" / folder)
        for c in cases:
            seg, g = io.read_image(out.case(c))
            for kind in UNCERTAINTY_KINDS:
                m, gm = io.read_image(out.uncertainty(c, kind))
                assert gm == g and m.dtype == np.uint8 and m.max() <= 100
    doubt = res["summary"]["uncertainty"]
    assert [r["case"] for r in doubt["per_case"]] == cases
    assert all(np.isfinite(r["score"]) and r["score"] >= 0 for r in doubt["per_case"])
    e = doubt["error_detection"]
    assert e["body_voxels"] > e["wrong_voxels"] > 0 and 0 <= e["uncertainty"]["auc"] <= 1
    assert sum(e["histograms"]["uncertainty"]["body"]) == e["body_voxels"]
    predicted = [p for c in res["summary"]["lesions"]["per_case"] for p in c["predicted"]]
    assert all(0 <= p["probability"] <= 1 and 0 <= p["uncertainty"] <= 1 for p in predicted)
    rows = list(csv.DictReader(open(run / "fold_0" / "validation" / "per_case.csv")))
    assert [float(r["Uncertainty Score"]) for r in rows] == pytest.approx([r["score"] for r in doubt["per_case"]])
    cv = crossval.crossval_summary(run, [0])["uncertainty"]
    assert cv["all_cases"]["error_detection"]["wrong_voxels"] == e["wrong_voxels"]
    assert json.dumps(cv["per_fold"]["0"]["ranking"]) == json.dumps(doubt["ranking"])  # NaN with one case
    for records, folder in ((validate.predict_test_set(run, 0, s), run / "fold_0" / "test_predictions"),
                            (crossval.predict_test_ensemble(run, [0], s), run / "test_ensemble")):
        assert records
        for r in records:
            case = Path(r["prediction"]).name[:-len(".nii.gz")]
            g = io.read_image(r["prediction"])[1]
            assert all(io.read_image(PredLayout(folder).uncertainty(case, k))[1] == g for k in UNCERTAINTY_KINDS)
    assert not list((run / "test_ensemble").glob("raw/uncertainty/*.nii.gz"))  # moved out of the staging folder
    # a validation case whose maps are missing is predicted again, with them
    gone = PredLayout(run / "fold_0" / "validation").uncertainty(cases[0], "spread")
    gone.unlink()
    validate.predict_validation(run, 0, s)
    assert gone.is_file()
