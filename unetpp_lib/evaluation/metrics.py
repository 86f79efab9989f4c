"""Segmentation metrics per label: nnU-Net v1's 13, plus 95 % Hausdorff distance and normalised surface Dice (mm)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

METRICS = ("Accuracy", "Dice", "False Discovery Rate", "False Negative Rate", "False Omission Rate",
           "False Positive Rate", "Jaccard", "Negative Predictive Value", "Precision", "Recall",
           "Total Positives Reference", "Total Positives Test", "True Negative Rate")
NAN = float("nan")


def _ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0."""
    return float(a / b) if b else NAN


def confusion_metrics(test: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """The 13 metrics of nnU-Net v1's evaluator for two boolean masks (NaN where undefined)."""
    tp = float(np.count_nonzero(test & ref))
    fp = float(np.count_nonzero(test & ~ref))
    fn = float(np.count_nonzero(~test & ref))
    tn = float(test.size) - tp - fp - fn
    both_empty = tp + fp + fn == 0
    return {
        "Accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "Dice": NAN if both_empty else _ratio(2 * tp, 2 * tp + fp + fn),
        "False Discovery Rate": _ratio(fp, tp + fp),
        "False Negative Rate": _ratio(fn, tp + fn),
        "False Omission Rate": _ratio(fn, fn + tn),
        "False Positive Rate": _ratio(fp, fp + tn),
        "Jaccard": NAN if both_empty else _ratio(tp, tp + fp + fn),
        "Negative Predictive Value": _ratio(tn, tn + fn),
        "Precision": _ratio(tp, tp + fp),
        "Recall": _ratio(tp, tp + fn),
        "Total Positives Reference": tp + fn,
        "Total Positives Test": tp + fp,
        "True Negative Rate": _ratio(tn, tn + fp),
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a mask (those with a 6-neighbour outside it)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_metrics(test: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> dict[str, float]:
    """95 % Hausdorff distance (max of both directed 95th percentiles) and normalised surface Dice, in mm."""
    if not test.any() and not ref.any():
        return {"Hausdorff Distance 95": NAN, "Surface Dice": NAN}
    if not test.any() or not ref.any():
        return {"Hausdorff Distance 95": NAN, "Surface Dice": 0.0}
    both = test | ref
    box = tuple(slice(max(0, int(i.min()) - 1), int(i.max()) + 2) for i in np.nonzero(both))
    t, r = test[box], ref[box]  # both surfaces lie inside the box, so distances within it are exact
    st, sr = _surface(t), _surface(r)
    d_to_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    d_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dt, dr = d_to_r[st], d_to_t[sr]
    hd95 = max(np.percentile(dt, 95), np.percentile(dr, 95))
    nsd = ((dt <= tolerance_mm).sum() + (dr <= tolerance_mm).sum()) / (len(dt) + len(dr))
    return {"Hausdorff Distance 95": float(hd95), "Surface Dice": float(nsd)}


def case_metrics(test: np.ndarray, ref: np.ndarray, labels, spacing, tolerance_mm: float = 2.0) -> dict[str, dict]:
    """Per label ("0", "1", ...): the 13 metrics plus surface metrics (NaN for background, whose 'surface' is the volume border)."""
    out = {}
    for lab in labels:
        surface = (surface_metrics(test == lab, ref == lab, spacing, tolerance_mm) if lab
                   else {"Hausdorff Distance 95": NAN, "Surface Dice": NAN})
        out[str(lab)] = {**confusion_metrics(test == lab, ref == lab), **surface}
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask; all of them if several tie (nnU-Net v1's rule)."""
    lab, n = ndimage.label(mask)  # scipy's default structure: faces only, as v1's post-processing uses it
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return np.isin(lab, np.flatnonzero(sizes == sizes.max()))
