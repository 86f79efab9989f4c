"""QA that points at the doubtful voxels: what the uncertainty maps saved beside a prediction say, and whether
they say more than a plain baseline.

The maps (written by inference, `PredLayout.uncertainty`) are uint8 in percent 0-100 in the prediction's geometry,
with C the number of classes (3: background, liver, tumour):
- entropy: entropy of the mean softmax, as % of ln(C) (0: certain, 100: uniform over the classes);
- spread: mutual information, i.e. the entropy of the mean minus the mean entropy of the averaged predictions
  (mirrorings, tiles, folds), as % of ln(C): how much those predictions disagree;
- confidence: the mean probability of the predicted (argmax) class, in % (inside a predicted tumour: the tumour
  probability).

Definitions (every volume in voxels of the case's own spacing, distances in mm):
- case score: sum of entropy/100 over the predicted structure grown by 5 mm (exact Euclidean distance in mm),
  divided by the predicted structure's voxel count: "uncertain volume per volume predicted" (0 for a certain
  prediction; NaN when the structure is not predicted). Structures: all foreground (seg > 0), liver (seg == 1),
  tumour (seg == 2).
- lesion probability and uncertainty: means over a predicted tumour component (6-connected, ids of
  `lesions.components`) of confidence/100 and entropy/100.
- error detection: inside the body (CT above -500 HU) a voxel is wrong when the prediction differs from the reference.
  Flag body voxels in rank order: by entropy, highest first; the baseline by distance (mm) to the nearest boundary
  between predicted labels (a voxel with a 6-neighbour of another predicted label is at 0 mm), nearest first, in
  0.5 mm bins up to 50 mm (farther in the last bin). The detection curve is (share of body voxels flagged, share of
  wrong voxels caught), voxels tied in one bin taken evenly (a straight line); the figures are the share caught in
  the top 1, 5 and 10 % of body voxels and the area under the curve (random flagging: the diagonal, area 0.5).
- ranking: Spearman rho over cases of the case score against the case's mean foreground Dice, and of the predicted
  foreground volume (the baseline) against it. A useful score is negatively correlated (more doubt, lower Dice);
  the magnitudes are compared.
- lesion thresholds: keep predicted lesions whose probability is at least t; precision = matched kept / kept, recall
  = reference lesions overlapped by a kept lesion / reference lesions; the baseline keeps the same number of
  lesions, largest first. PR-AUC is the average precision of sweeping every distinct value as a threshold (keep
  >= value), highest first: sum over those thresholds of (recall - previous recall) * precision, recall starting
  at 0; it is at most the recall of keeping every lesion.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..core.layout import UNCERTAINTY_KINDS, PredLayout
from . import lesions

NAN = float("nan")
BINS = 101  # percent values 0..100; boundary distances 0, 0.5, ... 50 mm
BIN_MM = 0.5
MARGIN_MM = 5.0
BODY_HU = -500.0
AT = (0.01, 0.05, 0.10)  # shares of body voxels flagged for the at_1pct, at_5pct and at_10pct figures
THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # a predicted (argmax) lesion of 3 classes has p > 1/3


def has_maps(folder: str | Path, case: str, kinds: tuple[str, ...] = UNCERTAINTY_KINDS) -> bool:
    """Whether a prediction folder holds the case's uncertainty maps of `kinds` (all three by default)."""
    layout = PredLayout(folder)
    return all(layout.uncertainty(case, k).is_file() for k in kinds)


def read_maps(folder: str | Path, case: str) -> dict[str, np.ndarray] | None:
    """The uncertainty maps of a case by kind (None without an entropy map; other missing maps left out)."""
    from ..core.io import read_image

    layout = PredLayout(folder)
    if not has_maps(folder, case, ("entropy",)):
        return None
    return {k: read_image(layout.uncertainty(case, k))[0] for k in UNCERTAINTY_KINDS
            if layout.uncertainty(case, k).exists()}


def _mask(seg: np.ndarray, label: int | None) -> np.ndarray:
    """All foreground (label None) or one label of a segmentation."""
    return seg > 0 if label is None else seg == label


def case_score(entropy_pct: np.ndarray, seg: np.ndarray, spacing, label: int | None = None,
               margin_mm: float = MARGIN_MM) -> float:
    """Sum of entropy/100 over the predicted structure grown by `margin_mm`, per predicted voxel (NaN if none)."""
    mask = _mask(seg, label)
    n = int(np.count_nonzero(mask))
    if not n:
        return NAN
    grow = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]  # voxels beyond the grown box are farther for sure
    box = tuple(slice(max(0, int(i.min()) - g), int(i.max()) + 1 + g) for i, g in zip(np.nonzero(mask), grow))
    near = ndimage.distance_transform_edt(~mask[box], sampling=spacing) <= margin_mm  # exact: the mask lies inside
    return float(entropy_pct[box][near].sum(dtype=np.float64) / 100.0 / n)


def lesion_confidence(seg: np.ndarray, confidence_pct: np.ndarray, entropy_pct: np.ndarray) -> list[dict]:
    """Per predicted tumour component (ids of `lesions.components`): mean confidence and entropy, both 0-1."""
    lab, n = lesions.components(seg == lesions.TUMOUR)
    flat = lab.ravel()
    size = np.bincount(flat, minlength=n + 1)[1:]
    conf = np.bincount(flat, weights=confidence_pct.ravel().astype(np.float64), minlength=n + 1)[1:]
    ent = np.bincount(flat, weights=entropy_pct.ravel().astype(np.float64), minlength=n + 1)[1:]
    return [{"id": i + 1, "probability": round(float(c / s / 100.0), 4), "uncertainty": round(float(e / s / 100.0), 4)}
            for i, (s, c, e) in enumerate(zip(size, conf, ent))]


def most_uncertain_point(entropy_pct: np.ndarray, window: int = 5) -> tuple[int, int, int]:
    """(z, y, x) at the centre of the most uncertain window^3 box (of tied boxes, the one nearest their centroid)."""
    mean = ndimage.uniform_filter(entropy_pct.astype(np.float32), size=window, mode="constant")
    top = float(mean.max())
    if top <= 0:
        return tuple(int(s // 2) for s in entropy_pct.shape)
    tied = np.argwhere(mean >= top * (1.0 - 1e-4))  # float32 running sums differ in the last bits
    best = tied[np.argmin(((tied - tied.mean(0)) ** 2).sum(1))]
    return tuple(int(v) for v in best)


def _boundary(seg: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour of another label."""
    edge = np.zeros(seg.shape, bool)
    for axis in range(seg.ndim):
        lo = [slice(None)] * seg.ndim
        hi = [slice(None)] * seg.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        diff = seg[tuple(lo)] != seg[tuple(hi)]
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    return edge


def _counts(values: np.ndarray, body: np.ndarray, wrong: np.ndarray) -> dict[str, list[int]]:
    """Per bin 0..100 of `values` (ints, clipped to 0..100): body and wrong body voxels."""
    return {k: np.bincount(np.clip(values[m], 0, BINS - 1).astype(np.intp), minlength=BINS).tolist()
            for k, m in (("body", body), ("wrong", wrong))}


def detection_histograms(entropy_pct: np.ndarray, seg: np.ndarray, ref: np.ndarray, image: np.ndarray, spacing,
                         body_hu: float = BODY_HU) -> dict:
    """Body and wrong body voxels per entropy percent and per 0.5 mm bin of distance to a predicted boundary."""
    body = image > body_hu
    wrong = body & (seg != ref)
    out = {"uncertainty": _counts(entropy_pct, body, wrong)}
    edge = _boundary(seg)
    dist_bin = np.full(seg.shape, BINS - 1, np.uint8)  # no boundary, or beyond the grown box: the last bin
    if edge.any():
        grow = [int(np.ceil(BIN_MM * (BINS - 1) / s)) + 1 for s in spacing]
        box = tuple(slice(max(0, int(i.min()) - g), int(i.max()) + 1 + g) for i, g in zip(np.nonzero(edge), grow))
        d = ndimage.distance_transform_edt(~edge[box], sampling=spacing)
        dist_bin[box] = np.minimum(np.floor(d / BIN_MM), BINS - 1).astype(np.uint8)
    out["boundary"] = _counts(dist_bin, body, wrong)
    return out


def pool(histograms: list[dict]) -> dict:
    """Element-wise sums of `detection_histograms` outputs (zeros for an empty list)."""
    out = {k: {"body": [0] * BINS, "wrong": [0] * BINS} for k in ("uncertainty", "boundary")}
    for h in histograms:
        for k, d in h.items():
            for part, counts in d.items():
                out[k][part] = [int(a + b) for a, b in zip(out[k][part], counts)]
    return out


def detection_curve(body, wrong, highest_first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(share of body voxels flagged, share of wrong voxels caught) at the bins' ends in rank order, from (0, 0);
    NaN shares when there are no body or no wrong voxels."""
    b, w = np.asarray(body, np.float64), np.asarray(wrong, np.float64)
    order = slice(None, None, -1) if highest_first else slice(None)
    b, w = b[order], w[order]
    keep = b > 0  # empty bins add no point (and no wrong voxel: wrong voxels are body voxels)
    x = np.concatenate([[0.0], np.cumsum(b[keep])])
    y = np.concatenate([[0.0], np.cumsum(w[keep])])
    return (x / x[-1] if x[-1] else np.full_like(x, NAN)), (y / y[-1] if y[-1] else np.full_like(y, NAN))


def _figures(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Share caught at 1, 5 and 10 % flagged (interpolated) and the area under a detection curve."""
    if not np.isfinite(y).all() or not np.isfinite(x).all():
        return {"at_1pct": NAN, "at_5pct": NAN, "at_10pct": NAN, "auc": NAN}
    at = [float(np.interp(a, x, y)) for a in AT]
    auc = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))  # exact for the piecewise linear curve
    return {"at_1pct": at[0], "at_5pct": at[1], "at_10pct": at[2], "auc": auc}


def detection_figures(h: dict) -> dict:
    """Error-detection figures of (pooled) histograms: uncertainty, the boundary baseline and random flagging."""
    body, wrong = int(sum(h["uncertainty"]["body"])), int(sum(h["uncertainty"]["wrong"]))
    unc = _figures(*detection_curve(h["uncertainty"]["body"], h["uncertainty"]["wrong"], highest_first=True))
    bnd = _figures(*detection_curve(h["boundary"]["body"], h["boundary"]["wrong"], highest_first=False))
    rnd = ({"at_1pct": AT[0], "at_5pct": AT[1], "at_10pct": AT[2], "auc": 0.5} if wrong else
           {"at_1pct": NAN, "at_5pct": NAN, "at_10pct": NAN, "auc": NAN})
    return {"uncertainty": unc, "boundary": bnd, "random": rnd, "body_voxels": body, "wrong_voxels": wrong,
            "beats_baseline": bool(unc["auc"] > bnd["auc"])}  # False when either is NaN


def curve_points(x: np.ndarray, y: np.ndarray, points: int = 49) -> list[list[float]]:
    """A detection curve sampled at 0, `points` shares spaced evenly in log from 0.1 % to 100 %, and 5 %."""
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return []
    grid = np.unique(np.concatenate([[0.0, AT[1]], np.geomspace(1e-3, 1.0, points)]))
    return [[round(float(a), 6), round(float(b), 6)] for a, b in zip(grid, np.interp(grid, x, y))]


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties) over pairs where both are finite; NaN with fewer than 3
    pairs or a constant side."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return NAN
    ra, rb = rankdata(a[ok]), rankdata(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den else NAN


def ranking(scores, dices, volumes) -> dict:
    """Spearman rho of case score vs Dice and of predicted volume (the baseline) vs Dice; a useful score has a
    negative rho (more doubt, lower Dice), and beats the baseline when it is negative and its |rho| is larger
    (False with a NaN)."""
    s, d = np.asarray(scores, np.float64), np.asarray(dices, np.float64)
    rs, rv = spearman(s, d), spearman(volumes, d)
    return {"cases": int(np.count_nonzero(np.isfinite(s) & np.isfinite(d))), "score_vs_dice": rs,
            "volume_vs_dice": rv, "beats_baseline": bool(rs < 0 and abs(rs) > abs(rv))}  # False with a NaN


def _lesion_lists(per_case_lesions: list[dict]) -> tuple[list[dict], list[set]]:
    """Predicted lesions of the labelled cases (with a `case` index added) and, per reference lesion, the set of
    (case, predicted id) overlapping it."""
    pred, refs = [], []
    for i, c in enumerate(per_case_lesions):
        if c.get("reference") is None:
            continue
        pred += [{**p, "case": i} for p in c.get("predicted", [])]
        refs += [{(i, p) for p in r["predicted"]} for r in c["reference"]]
    return pred, refs


def _row(kept: list[dict], refs: list[set], threshold: float) -> dict:
    """Kept, matched, precision and recall of a set of kept predicted lesions."""
    ids = {(p["case"], p["id"]) for p in kept}
    hit = sum(bool(p["matched"]) for p in kept)
    found = sum(bool(r & ids) for r in refs)
    return {"threshold": threshold, "kept": len(kept), "matched": hit,
            "precision": hit / len(kept) if kept else NAN, "recall": found / len(refs) if refs else NAN}


def _pr_auc(pred: list[dict], refs: list[set], key: str) -> float:
    """Average precision of sweeping every distinct value of `key` (keep >= value, highest first)."""
    if not pred or not refs:
        return NAN
    auc, last = 0.0, 0.0
    for v in sorted({p[key] for p in pred}, reverse=True):
        r = _row([p for p in pred if p[key] >= v], refs, v)
        auc += (r["recall"] - last) * r["precision"]
        last = r["recall"]
    return float(auc)


def lesion_thresholds(per_case_lesions: list[dict], thresholds=THRESHOLDS) -> dict:
    """Lesion precision and recall keeping predicted lesions of probability >= t, beside the volume baseline that
    keeps as many, largest first; NaN figures when a predicted lesion has no probability (maps not saved)."""
    pred, refs = _lesion_lists(per_case_lesions)
    if any("probability" not in p for p in pred):
        empty = {"threshold": NAN, "kept": NAN, "matched": NAN, "precision": NAN, "recall": NAN}
        return {"confidence": [{**empty, "threshold": float(t)} for t in thresholds],
                "volume": [dict(empty) for _ in thresholds], "pr_auc": {"confidence": NAN, "volume": NAN},
                "beats_baseline": False, "note": "predicted lesions without a probability (maps not saved)"}
    conf = [_row([p for p in pred if p["probability"] >= t], refs, float(t)) for t in thresholds]
    largest = sorted(pred, key=lambda p: -p["volume_ml"])  # stable: equal volumes keep their order
    vol = []
    for row in conf:
        kept = largest[:row["kept"]]
        vol.append(_row(kept, refs, float(kept[-1]["volume_ml"]) if kept else NAN))
    auc = {"confidence": _pr_auc(pred, refs, "probability"), "volume": _pr_auc(pred, refs, "volume_ml")}
    return {"confidence": conf, "volume": vol, "pr_auc": auc, "beats_baseline": bool(auc["confidence"] > auc["volume"])}


def case_uncertainty(seg: np.ndarray, ref: np.ndarray | None, image: np.ndarray, maps: dict[str, np.ndarray],
                     spacing) -> dict:
    """One case's scores, predicted volume, lesion confidences and error-detection histograms (None unlabelled)."""
    entropy = maps["entropy"]
    return {"score": case_score(entropy, seg, spacing),
            "score_by_label": {str(k): case_score(entropy, seg, spacing, label=k) for k in (1, 2)},
            "predicted_ml": float(np.count_nonzero(seg) * float(np.prod(spacing)) / 1000.0),
            "lesions": lesion_confidence(seg, maps["confidence"], entropy) if "confidence" in maps else [],
            "histograms": detection_histograms(entropy, seg, ref, image, spacing) if ref is not None else None}


DEFINITIONS = {
    "entropy": "entropy of the mean softmax, % of ln(C)",
    "spread": "mutual information over the averaged predictions (mirrorings, tiles, folds), % of ln(C)",
    "confidence": "mean probability of the predicted class, %",
    "score": f"sum of entropy/100 over the predicted structure grown by {MARGIN_MM:g} mm, per predicted voxel",
    "error_detection": f"body (CT > {BODY_HU:g} HU) voxels flagged by entropy, highest first, vs wrong voxels "
                       f"(prediction != reference); baseline: distance to a predicted label boundary, nearest "
                       f"first ({BIN_MM:g} mm bins); at_Npct: share of wrong voxels in the top N % of body voxels",
    "ranking": "Spearman rho over cases vs mean foreground Dice: case score, and predicted volume (baseline); "
               "a useful score has a negative rho",
    "lesion_thresholds": "keep predicted lesions with mean tumour probability >= t; baseline keeps as many, "
                         "largest first; pr_auc: average precision over every distinct value",
}


def section(cases: list[str], per_case: list[dict], dice: list[float], lesion_cases: list[dict] | None) -> dict:
    """The `uncertainty` section of summary.json (per_case entries may be None for cases without maps)."""
    rows = [{"case": c, "score": d["score"] if d else NAN, "score_by_label": d["score_by_label"] if d else None,
             "predicted_ml": d["predicted_ml"] if d else NAN, "dice": float(k)}
            for c, d, k in zip(cases, per_case, dice)]
    return pooled_section(rows, [d["histograms"] for d in per_case if d and d.get("histograms")], lesion_cases)


def pooled_section(rows: list[dict], histograms: list[dict], lesion_cases: list[dict] | None) -> dict:
    """The section from its per-case rows, the cases' (or folds' pooled) histograms and lesions: also what the
    cross-validation pools over folds. The pooled histograms are kept (`error_detection.histograms`)."""
    pooled = pool(histograms)
    curves = {"uncertainty": curve_points(*detection_curve(pooled["uncertainty"]["body"],
                                                           pooled["uncertainty"]["wrong"], True)),
              "boundary": curve_points(*detection_curve(pooled["boundary"]["body"], pooled["boundary"]["wrong"],
                                                        False))}
    return {"unit": "entropy and spread: % of ln(C), C classes; confidence: %; score: uncertain voxels per "
                    "predicted voxel; shares 0-1; volumes ml",
            "definitions": dict(DEFINITIONS), "per_case": rows,
            "error_detection": {**detection_figures(pooled), "curve": curves, "histograms": pooled},
            "ranking": ranking([r["score"] for r in rows], [r["dice"] for r in rows],
                               [r["predicted_ml"] for r in rows]),
            "lesion_thresholds": lesion_thresholds(lesion_cases) if lesion_cases is not None else None}


def report_rows(sec: dict) -> list[dict]:
    """The section's figures as table rows (what 05_validate shows): error detection, ranking, lesion precision."""
    e, r, t = sec["error_detection"], sec["ranking"], sec.get("lesion_thresholds") or {}
    rows = [{"figure": f"wrong voxels in the most uncertain {n} % of the body", "uncertainty": e["uncertainty"][k],
             "baseline": e["boundary"][k], "random": e["random"][k]}
            for n, k in (("1", "at_1pct"), ("5", "at_5pct"), ("10", "at_10pct"))]
    rows.append({"figure": "error-detection area under the curve", "uncertainty": e["uncertainty"]["auc"],
                 "baseline": e["boundary"]["auc"], "random": 0.5})
    rows.append({"figure": f"Spearman rho with the case Dice ({r['cases']} cases)", "uncertainty": r["score_vs_dice"],
                 "baseline": r["volume_vs_dice"], "random": 0.0})
    if t:
        rows.append({"figure": "lesion detection: average precision", "uncertainty": t["pr_auc"]["confidence"],
                     "baseline": t["pr_auc"]["volume"], "random": NAN})
    return rows


def verdicts(sec: dict) -> list[str]:
    """One line per figure saying whether the uncertainty beats its baseline (said plainly when it does not)."""
    e, r, t = sec["error_detection"], sec["ranking"], sec.get("lesion_thresholds") or {}
    out = [("error detection: the uncertainty finds wrong voxels better than the distance to a predicted boundary"
            if e["beats_baseline"] else "error detection: the uncertainty does NOT find wrong voxels better than "
            "the distance to a predicted boundary (the baseline)"),
           ("case ranking: the case score predicts a low Dice better than the predicted volume"
            if r["beats_baseline"] else "case ranking: the case score does NOT predict a low Dice better than the "
            f"predicted volume (rho {r['score_vs_dice']:.2f} vs {r['volume_vs_dice']:.2f}, {r['cases']} cases)")]
    if t:
        out.append("lesions: dropping low-probability lesions keeps precision better than dropping the smallest"
                   if t["beats_baseline"] else "lesions: dropping low-probability lesions does NOT beat dropping the "
                   "smallest ones (the baseline)")
    return out
