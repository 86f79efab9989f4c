import math

import numpy as np
import pytest
from scipy import ndimage

from unetpp_lib.evaluation.metrics import case_metrics, confusion_metrics, largest_component, surface_metrics


def test_confusion_metrics_by_hand():
    ref = np.zeros((4, 5, 5), bool)
    ref[0, :2, :5] = True  # 10 voxels
    test = np.zeros_like(ref)
    test[0, 1:3, :5] = True  # 10 voxels, 5 overlap
    m = confusion_metrics(test, ref)  # tp 5, fp 5, fn 5, tn 85
    assert m["Dice"] == pytest.approx(0.5) and m["Jaccard"] == pytest.approx(5 / 15)
    assert m["Precision"] == m["Recall"] == pytest.approx(0.5)
    assert m["Accuracy"] == pytest.approx(90 / 100) and m["True Negative Rate"] == pytest.approx(85 / 90)
    assert m["False Positive Rate"] == pytest.approx(5 / 90) and m["False Omission Rate"] == pytest.approx(5 / 90)
    assert m["False Discovery Rate"] == pytest.approx(0.5) and m["False Negative Rate"] == pytest.approx(0.5)
    assert m["Negative Predictive Value"] == pytest.approx(85 / 90)
    assert m["Total Positives Test"] == 10 and m["Total Positives Reference"] == 10
    assert len(m) == 13


def test_empty_masks():
    empty = np.zeros((3, 3, 3), bool)
    m = confusion_metrics(empty, empty)
    assert math.isnan(m["Dice"]) and math.isnan(m["Jaccard"]) and math.isnan(m["Precision"])
    assert m["Accuracy"] == 1.0 and m["Total Positives Test"] == 0
    full = np.ones_like(empty)
    assert confusion_metrics(empty, full)["Dice"] == 0.0
    s = surface_metrics(empty, empty, (1, 1, 1), 1.0)
    assert math.isnan(s["Hausdorff Distance 95"]) and math.isnan(s["Surface Dice"])
    assert surface_metrics(empty, full, (1, 1, 1), 1.0)["Surface Dice"] == 0.0


def test_surface_metrics_in_millimetres():
    ref = np.zeros((10, 20, 30), bool)
    ref[3:7, 5:15, 5:15] = True
    test = np.zeros_like(ref)
    test[3:7, 5:15, 7:17] = True  # shifted 2 voxels along x
    s = surface_metrics(test, ref, spacing=(2.0, 1.0, 1.5), tolerance_mm=1.0)
    assert s["Hausdorff Distance 95"] == pytest.approx(3.0)  # 2 voxels x 1.5 mm
    same = surface_metrics(ref, ref, (2.0, 1.0, 1.5), 0.5)
    assert same["Hausdorff Distance 95"] == 0 and same["Surface Dice"] == 1.0
    loose = surface_metrics(test, ref, (2.0, 1.0, 1.5), tolerance_mm=3.0)
    assert loose["Surface Dice"] == 1.0 and s["Surface Dice"] < 1.0


def test_case_metrics_labels_and_largest_component():
    ref = np.zeros((5, 10, 10), np.uint8)
    ref[1:4, 2:8, 2:8] = 1
    ref[2, 4, 4] = 2
    m = case_metrics(ref, ref, [0, 1, 2], (1, 1, 1))
    assert set(m) == {"0", "1", "2"} and all(m[k]["Dice"] == 1.0 for k in m)
    mask = np.zeros((5, 10, 10), bool)
    mask[0:2, 0:2, 0:2] = True
    mask[3:5, 5:9, 5:9] = True
    assert largest_component(mask).sum() == 32
    mask[2, 4, 4] = True  # touches the large cube at a corner only: a component of its own (6-connectivity)
    assert largest_component(mask).sum() == 32 and not largest_component(mask)[2, 4, 4]
    tie = np.zeros((5, 10, 10), bool)
    tie[0:2, 0:2, 0:2] = tie[3:5, 5:7, 5:7] = True
    assert largest_component(tie).sum() == 16  # equal largest components are all kept


def test_invented_volume_counts_only_voxels_beyond_the_margin():
    from unetpp_lib.evaluation.metrics import invented_volume, outside_margin

    organ = np.zeros((40, 50, 60), bool)
    organ[10:20, 10:20, 10:20] = True
    spacing = (2.0, 1.0, 1.5)
    pred = np.zeros_like(organ)
    pred[10:20, 10:20, 10:20] = True  # the organ itself: nothing invented
    pred[10:20, 10:20, 27] = True  # x 8 voxels = 12 mm beyond the organ's last column: invented (100 voxels)
    pred[10:20, 25, 10:20] = True  # y 6 voxels = 6 mm beyond: within the margin
    pred[38, 45, 55] = True  # far corner, outside the grown box
    brute = ndimage.distance_transform_edt(~organ, sampling=spacing)
    assert outside_margin(pred, organ, spacing) == int((pred & (brute > 10)).sum()) == 101
    v = invented_volume(pred, organ, spacing)
    assert v["Invented Volume ml"] == pytest.approx(101 * 3.0 / 1000)
    assert v["Invented Volume %"] == pytest.approx(100 * 101 / 1000)
    assert outside_margin(pred, np.zeros_like(organ), spacing) == pred.sum()  # no organ: all of it
