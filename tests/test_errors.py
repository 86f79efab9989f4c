"""Error maps: the codes of the error map and of the tumours' 3D view, and the voxel a picture cuts through."""
import numpy as np

from unetpp_lib.evaluation.errors import error_map, focus_point, tumour_errors


def test_error_map_labels_on_known_masks():
    ref = np.array([0, 1, 1, 2, 2, 2, 0, 1, 2], np.uint8)
    pred = np.array([0, 1, 0, 2, 1, 0, 1, 2, 2], np.uint8)
    # bg agreed, liver agreed, liver missed, tumour agreed, tumour->liver missed, tumour missed,
    # liver invented in background, tumour invented in liver, tumour agreed
    assert error_map(ref, pred).tolist() == [0, 1, 3, 2, 3, 3, 4, 4, 2]
    # the 3D view's codes: liver boundary errors become plain liver, tumour errors stay
    assert tumour_errors(ref, pred).tolist() == [0, 1, 1, 2, 3, 3, 1, 4, 2]


def test_focus_point_prefers_tumour_then_liver():
    lab = np.zeros((10, 12, 14), np.uint8)
    lab[2:8, 2:10, 2:12] = 1
    assert focus_point(lab) == (4, 5, 6)  # liver voxel nearest the liver centroid (4.5, 5.5, 6.5)
    lab[7, 9, 3] = 2
    assert focus_point(lab) == (7, 9, 3)
    assert focus_point(None) == (0, 0, 0)
