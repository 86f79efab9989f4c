"""Segmentation metrics per label: nnU-Net v1's 13, plus 95 % Hausdorff distance and normalised surface Dice (mm)
and the volume a prediction invents away from the organ (ml and % of the reference liver, beyond a 10 mm margin)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

METRICS = ("Accuracy", "Dice", "False Discovery Rate", "False Negative Rate", "False Omission Rate",
           "False Positive Rate", "Jaccard", "Negative Predictive Value", "Precision", "Recall",
           "Total Positives Reference", "Total Positives Test", "True Negative Rate")
NAN = float("nan")
MARGIN_MM = 10.0  # predicted voxels farther than this from the reference organ are "invented far away"
INVENTED_ML, INVENTED_PCT = "Invented Volume ml", "Invented Volume %"


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


def outside_margin(mask: np.ndarray, organ: np.ndarray, spacing, margin_mm: float = MARGIN_MM) -> int:
    """Voxels of `mask` farther than `margin_mm` from every voxel of `organ` (all of them when there is no organ)."""
    if not organ.any():
        return int(np.count_nonzero(mask))
    grow = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(0, int(i.min()) - g), int(i.max()) + 1 + g) for i, g in zip(np.nonzero(organ), grow))
    far = int(np.count_nonzero(mask)) - int(np.count_nonzero(mask[box]))  # beyond the grown box: farther for sure
    near = ndimage.distance_transform_edt(~organ[box], sampling=spacing)  # exact: the organ lies inside the box
    return far + int(np.count_nonzero(mask[box] & (near > margin_mm)))


def invented_volume(test: np.ndarray, organ: np.ndarray, spacing, margin_mm: float = MARGIN_MM) -> dict[str, float]:
    """Volume (ml) of a predicted mask beyond `margin_mm` of the reference organ, and as % of the organ's volume."""
    ml = outside_margin(test, organ, spacing, margin_mm) * float(np.prod(spacing)) / 1000.0
    organ_ml = float(np.count_nonzero(organ)) * float(np.prod(spacing)) / 1000.0
    return {INVENTED_ML: ml, INVENTED_PCT: 100.0 * ml / organ_ml if organ_ml else NAN}


def case_metrics(test: np.ndarray, ref: np.ndarray, labels, spacing, tolerance_mm: float = 2.0) -> dict[str, dict]:
    """Per label ("0", "1", ...): the 13 metrics plus surface metrics and the volume invented beyond 10 mm of the
    reference organ (every foreground label of the reference: the liver with its tumours); NaN for background."""
    out, organ = {}, ref > 0
    for lab in labels:
        extra = ({**surface_metrics(test == lab, ref == lab, spacing, tolerance_mm),
                  **invented_volume(test == lab, organ, spacing)} if lab else
                 {"Hausdorff Distance 95": NAN, "Surface Dice": NAN, INVENTED_ML: NAN, INVENTED_PCT: NAN})
        out[str(lab)] = {**confusion_metrics(test == lab, ref == lab), **extra}
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask; all of them if several tie (nnU-Net v1's rule)."""
    lab, n = ndimage.label(mask)  # scipy's default structure: faces only, as v1's post-processing uses it
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return np.isin(lab, np.flatnonzero(sizes == sizes.max()))
