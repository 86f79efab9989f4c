"""Post-processing as nnU-Net v1: keep the largest connected components where v1's rule says so.

Shared by fold validation (one fold's validation cases) and the fold ensemble (all folds' cases together).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.io import read_image, write_image
from ..core.layout import PredLayout, RawLayout
from .metrics import largest_component


def apply_postprocessing(seg: np.ndarray, decision: dict) -> np.ndarray:
    """Largest connected component of all foreground and/or of chosen classes, as decided."""
    out = seg.copy()
    if decision["lcc_all_foreground"]:
        out[~largest_component(out > 0)] = 0
    for cls in decision["lcc_classes"]:
        mask = out == cls
        out[mask & ~largest_component(mask)] = 0
    return out


def _mean_dice(segs: dict, refs: dict, classes) -> dict[int, float]:
    """Mean Dice per class over cases (NaN where both empty)."""
    out = {}
    for c in classes:
        vals = []
        for k in refs:
            t, r = segs[k] == c, refs[k] == c
            denom = t.sum() + r.sum()
            vals.append(np.nan if denom == 0 else 2 * (t & r).sum() / denom)  # both empty: NaN, as v1's evaluator
        out[c] = float(np.nanmean(vals)) if not all(np.isnan(vals)) else float("nan")
    return out


def decide_postprocessing(pred_dir: str | Path, raw_dir: str | Path, cases: list[str], classes) -> dict:
    """nnU-Net v1's post-processing decision on the predictions of these cases (see `decide_on_files`)."""
    return decide_on_files({c: PredLayout(pred_dir).case(c) for c in cases}, raw_dir, classes)


def decide_on_files(predictions: dict[str, Path], raw_dir: str | Path, classes) -> dict:
    """The post-processing decision for predictions given case by case (from one folder or several folds).

    As nnU-Net v1's `determine_postprocessing`, on the mean Dice per class over cases: keep the largest
    component of all foreground only if some class's Dice rises and none falls; then (with more than one
    class) keep each class's largest component where that class's Dice rises over the step before.
    """
    segs = {c: read_image(p)[0] for c, p in predictions.items()}
    refs = {c: read_image(RawLayout(raw_dir).label(c))[0].astype(np.uint8) for c in predictions}
    classes = list(classes)
    before = _mean_dice(segs, refs, classes)
    fg = {"lcc_all_foreground": True, "lcc_classes": []}
    after = _mean_dice({k: apply_postprocessing(v, fg) for k, v in segs.items()}, refs, classes)
    # NaN (no case has the class) compares False both ways, as in v1
    use_fg = any(after[c] > before[c] for c in classes) and not any(after[c] < before[c] for c in classes)
    base = after if use_fg else before
    lcc_classes = []
    if len(classes) > 1:  # with one class the all-foreground step already was the per-class one
        # removing a class's islands only relabels its own voxels background, so one pass scores every class
        every = {"lcc_all_foreground": use_fg, "lcc_classes": classes}
        per_class = _mean_dice({k: apply_postprocessing(v, every) for k, v in segs.items()}, refs, classes)
        lcc_classes = [c for c in classes if per_class[c] > base[c]]
        base = {c: per_class[c] if c in lcc_classes else base[c] for c in classes}
    return {"lcc_all_foreground": use_fg, "lcc_classes": lcc_classes,
            "dice_before": {str(k): v for k, v in before.items()}, "dice_after": {str(k): v for k, v in base.items()}}


def write_postprocessed(src_dir: str | Path, dst_dir: str | Path, names: list[str], decision: dict) -> None:
    """Apply a post-processing decision to predictions, writing them with unchanged geometry."""
    for name in names:
        seg, geom = read_image(Path(src_dir) / name)
        write_image(Path(dst_dir) / name, apply_postprocessing(seg, decision), geom)
