"""Lesion matching on hand-made masks; every number below is worked out by hand in the comments."""
import json
import math

import numpy as np
import pytest

from unetpp_lib import validate
from unetpp_lib.evaluation import crossval, lesions

# voxels of 5 x 10 x 10 mm = 500 mm^3 = 0.5 ml each, so the volume bins are reachable with a few voxels
SPACING = (5.0, 10.0, 10.0)


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Liver with four reference lesions and four predicted ones (ids in raster order z, y, x)."""
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[:, :18, :18] = 1  # liver
    pred = ref.copy()
    # G1 split: 2*3*6 = 36 voxels = 18 ml (> 10 ml); predicted as two pieces with a gap at x = 3, 4:
    ref[1:3, 1:4, 1:7] = 2
    pred[1:3, 1:4, 1:3] = 2  # P1: 2*3*2 = 12 voxels (6 ml), all inside G1
    pred[1:3, 1:4, 5:8] = 2  # P2: 2*3*3 = 18 voxels (9 ml), 12 inside G1 (x = 5, 6), 6 outside (x = 7)
    # G2, G3 merged: 2*2*2 = 8 voxels = 4 ml each, apart at x = 3, 4; one prediction over both and the gap
    ref[5:7, 1:3, 1:3] = 2
    ref[5:7, 1:3, 5:7] = 2
    pred[5:7, 1:3, 1:7] = 2  # P3: 2*2*6 = 24 voxels (12 ml)
    ref[8, 10, 10] = 2  # G4: one voxel, 0.5 ml (< 1 ml), missed
    pred[8, 15:17, 15:17] = 2  # P4: 1*2*2 = 4 voxels (2 ml), false
    return pred, ref


def test_split_merged_missed_and_false_lesions():
    out = lesions.case_lesions(*hand_case(), SPACING)
    g = {r["id"]: r for r in out["reference"]}
    p = {q["id"]: q for q in out["predicted"]}
    assert [g[i]["voxels"] for i in (1, 2, 3, 4)] == [36, 8, 8, 1]
    assert [g[i]["volume_ml"] for i in (1, 2, 3, 4)] == [18.0, 4.0, 4.0, 0.5]
    assert [g[i]["bin"] for i in (1, 2, 3, 4)] == [">10 ml", "1-10 ml", "1-10 ml", "<1 ml"]
    # split: G1 detected once, through both pieces; Dice 2 * (12 + 12) / (36 + 12 + 18) = 48 / 66
    assert g[1]["detected"] and g[1]["predicted"] == [1, 2]
    assert g[1]["dice"] == pytest.approx(48 / 66)
    assert p[1]["matched"] and p[2]["matched"] and p[1]["reference"] == p[2]["reference"] == [1]
    # merge: G2 and G3 each detected by P3; each Dice 2 * 8 / (8 + 24) = 0.5; P3 matched once
    assert g[2]["detected"] and g[3]["detected"] and g[2]["predicted"] == g[3]["predicted"] == [3]
    assert g[2]["dice"] == g[3]["dice"] == pytest.approx(0.5)
    assert p[3]["matched"] and p[3]["reference"] == [2, 3] and p[3]["volume_ml"] == 12.0
    # the small one missed (Dice 0), the invented one false
    assert not g[4]["detected"] and g[4]["dice"] == 0.0 and g[4]["predicted"] == []
    assert not p[4]["matched"] and p[4]["volume_ml"] == 2.0
    # 4 reference, 3 detected; 4 predicted, 3 matched
    assert out["counts"] == {"reference": 4, "detected": 3, "missed": 1, "predicted": 4, "matched": 3, "false": 1}
    assert out["recall"] == 0.75 and out["precision"] == 0.75
    # G1's voxels z 1-2, y 1-3, x 1-6: centroid (1.5, 2, 3.5); (1, 2, 3) is the first of the four nearest
    assert g[1]["centre"] == [1, 2, 3]
    # tumour 36 + 8 + 8 + 1 = 53 voxels = 26.5 ml; predicted 12 + 18 + 24 + 4 = 58 voxels = 29 ml
    assert out["volumes_ml"]["reference"]["tumour"] == 26.5 and out["volumes_ml"]["prediction"]["tumour"] == 29.0


def test_overall_by_volume_bin():
    case = lesions.case_lesions(*hand_case(), SPACING)
    empty = lesions.case_lesions(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), SPACING)
    assert math.isnan(empty["recall"]) and math.isnan(empty["precision"])  # nothing to find, nothing found
    sec = lesions.section(["a", "b"], [case, empty])
    o = sec["overall"]
    assert sec["connectivity"] == 6 and [c["case"] for c in sec["per_case"]] == ["a", "b"]
    assert o["recall"] == 0.75 and o["precision"] == 0.75
    b = o["by_volume"]
    # < 1 ml: G4 missed; no prediction that small -> precision NaN
    assert b["<1 ml"]["counts"]["reference"] == 1 and b["<1 ml"]["recall"] == 0.0 and math.isnan(b["<1 ml"]["precision"])
    # 1-10 ml: G2, G3 detected; predictions P1 (6 ml), P2 (9 ml) matched, P4 (2 ml) false -> 2 / 3
    assert b["1-10 ml"]["recall"] == 1.0 and b["1-10 ml"]["precision"] == pytest.approx(2 / 3)
    # > 10 ml: G1 detected; P3 (12 ml) matched
    assert b[">10 ml"]["recall"] == 1.0 and b[">10 ml"]["precision"] == 1.0
    # mean lesion Dice (48/66 + 0.5 + 0.5 + 0) / 4; over detected lesions only / 3
    assert o["lesion_dice_mean"] == pytest.approx((48 / 66 + 1.0) / 4)
    assert o["lesion_dice_mean_detected"] == pytest.approx((48 / 66 + 1.0) / 3)
    rows = lesions.lesion_rows(sec)
    assert [r["lesion"] for r in rows] == ["G1", "G2", "G3", "G4", "P4"]
    assert [r["finding"] for r in rows] == ["detected", "detected", "detected", "missed", "false"]
    table = lesions.bin_table(o)
    assert table[-1] == {"lesions (ml)": "all", "reference": 4, "detected": 3, "recall": 0.75, "predicted": 4,
                         "matched": 3, "precision": 0.75}


def test_components_are_six_connected():
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner contact only: two lesions
    mask[2, 2, 2] = mask[2, 2, 1] = True  # a shared face: one lesion, which touches (1, 1, 1) at an edge only
    assert lesions.components(mask)[1] == 3


def test_lesion_bins_edges():
    assert [lesions.volume_bin(v) for v in (0.999, 1.0, 10.0, 10.001)] == ["<1 ml", "1-10 ml", "1-10 ml", ">10 ml"]


def test_prediction_without_ground_truth():
    pred, _ = hand_case()
    out = lesions.case_lesions(pred, None, SPACING)
    assert out["reference"] is None and out["counts"] == {"predicted": 4}
    assert [q["matched"] for q in out["predicted"]] == [None] * 4 and "reference" not in out["volumes_ml"]
    assert [r["finding"] for r in lesions.lesion_rows([{"case": "t", **out}])] == ["predicted"] * 4


def test_crossval_pools_the_folds_lesions(tmp_path):
    case = lesions.case_lesions(*hand_case(), SPACING)  # 4 lesions, 3 detected; 4 predicted, 3 matched
    missed = lesions.case_lesions(np.zeros((4, 4, 4), np.uint8), np.full((4, 4, 4), 2, np.uint8), SPACING)
    metrics = {"1": {m: 0.9 for m in crossval.CV_METRICS}, "2": {m: 0.5 for m in crossval.CV_METRICS}}
    for k, found in ((0, [case]), (1, [missed])):
        summary = validate.summary_json([metrics], [1, 2], f"fold {k}")
        summary["lesions"] = lesions.section([f"c{k}"], found)
        (tmp_path / f"fold_{k}" / "validation").mkdir(parents=True)
        (tmp_path / f"fold_{k}" / "validation" / "summary.json").write_text(json.dumps(summary))
    cv = crossval.crossval_summary(tmp_path, [0, 1])["lesions"]
    assert cv["per_fold"]["0"]["recall"] == 0.75 and cv["per_fold"]["1"]["recall"] == 0.0
    # pooled: 4 + 1 reference lesions, 3 detected; 4 + 0 predicted, 3 matched
    assert cv["all_cases"]["recall"] == pytest.approx(3 / 5) and cv["all_cases"]["precision"] == 0.75
    assert cv["all_cases"]["by_volume"][">10 ml"]["counts"]["reference"] == 2  # G1 (18 ml) and the 32 ml block
    written = json.loads((tmp_path / "crossval_summary.json").read_text())
    assert written["lesions"]["all_cases"]["counts"]["detected"] == 3
