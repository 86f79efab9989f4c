"""Where a prediction and its reference disagree: error-map codes, the tumours' error codes, and the voxel to look at.

Plain numpy (scipy for the error regions): the pictures (qa/plots.py) and the review browser colour these codes.
"""
from __future__ import annotations

import numpy as np


def focus_point(label: np.ndarray | None) -> tuple[int, int, int]:
    """Voxel to slice through: the tumour voxel nearest the tumour centroid, else the liver's, else the centre."""
    if label is not None:
        for cls in (2, 1):
            pts = np.argwhere(label == cls)
            if len(pts):
                nearest = np.argmin(((pts - pts.mean(0)) ** 2).sum(1))
                return tuple(int(v) for v in pts[nearest])
    shape = label.shape if label is not None else (0, 0, 0)
    return tuple(s // 2 for s in shape)


def error_map(ref: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Error map codes (uint8, 0 elsewhere): 1 agreed liver, 2 agreed tumour, 3 missed, 4 invented.

    Tumour outranks liver: where the labels differ, a voxel is missed when the reference's label is the
    higher one (tumour predicted as liver or background, liver predicted as background) and invented
    when the prediction's is (tumour predicted in liver, anything predicted in background).
    """
    out = np.zeros(ref.shape, np.uint8)
    out[(ref == 1) & (pred == 1)] = 1
    out[(ref == 2) & (pred == 2)] = 2
    out[ref > pred] = 3
    out[pred > ref] = 4
    return out


def tumour_errors(ref: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Tumour error codes (the review's 3D view): 1 liver (either mask's), tumour 2 agreed, 3 missed, 4 invented.

    The liver's own boundary errors are left to the planes: in 3D their thin shells would hide the tumours.
    """
    out = ((ref > 0) | (pred > 0)).astype(np.uint8)
    out[(ref == 2) & (pred == 2)] = 2
    out[(ref == 2) & (pred != 2)] = 3
    out[(pred == 2) & (ref != 2)] = 4
    return out


def error_focus(ref: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """Voxel in the largest connected error region (a voxel of it nearest its centroid), else the tumour/liver focus."""
    from scipy import ndimage

    err = (ref != pred) & ((ref > 0) | (pred > 0))
    if err.any():
        lab, n = ndimage.label(err)
        biggest = np.bincount(lab.ravel())[1:].argmax() + 1
        return focus_point((lab == biggest).astype(np.uint8) * 2)
    return focus_point(ref)
