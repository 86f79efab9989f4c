"""Lesion-wise findings: each tumour as a connected component, matched between ground truth and prediction.

Components are 6-connected (voxels sharing a face), as `metrics.largest_component` and nnU-Net v1's
post-processing count them, so "one component" means the same thing everywhere in the kit; two
tumour voxels touching only at an edge or a corner belong to different lesions.

The matching rule (overlap, many-to-many), for reference lesions G (label 2 in the ground truth)
and predicted lesions P (label 2 in the prediction):
- a reference lesion is **detected** when at least one of its voxels is predicted tumour, i.e. when
  it overlaps at least one predicted lesion; otherwise it is **missed**;
- a predicted lesion is **matched** when at least one of its voxels is reference tumour; otherwise
  it is **false** (invented);
- split lesion (one reference lesion overlapped by several predicted ones): the reference lesion
  counts once as detected and every one of those predicted lesions counts as matched;
- merged lesions (one predicted lesion overlapping several reference ones): each reference lesion
  counts as detected and the predicted lesion counts once as matched;
- the Dice of a reference lesion g is 2 |g & U| / (|g| + |U|) with U the union of the predicted lesions
  that overlap it (0 when missed); a merge therefore lowers the Dice of each lesion it swallows,
  since U includes the voxels over the other lesions.
Detection recall = detected / reference lesions; precision = matched / predicted lesions (NaN when
there are none). Volume bins (ml): "<1 ml" below 1, "1-10 ml" from 1 to 10 inclusive, ">10 ml" above
10; a reference lesion's bin gives recall, a predicted lesion's bin gives precision.
"""
from __future__ import annotations

import numpy as np

TUMOUR = 2
CONNECTIVITY = 6
BINS = ("<1 ml", "1-10 ml", ">10 ml")
NAN = float("nan")


def volume_bin(ml: float) -> str:
    """The volume bin of a lesion of `ml` millilitres."""
    return BINS[0] if ml < 1.0 else BINS[1] if ml <= 10.0 else BINS[2]


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components of a boolean (z, y, x) mask: a label image (0 outside) and their count."""
    from skimage import measure  # imported here: only lesion work needs it

    lab, n = measure.label(mask, connectivity=1, return_num=True)  # connectivity=1: faces only, 6 in 3D
    return lab.astype(np.int32), int(n)


def _centres(lab: np.ndarray, n: int) -> list[list[int]]:
    """Per component 1..n, its voxel nearest its centroid (z, y, x): a point inside even for a curved lesion."""
    from skimage import measure

    out = [[0, 0, 0]] * n
    for r in measure.regionprops(lab):
        c = r.coords
        out[r.label - 1] = [int(v) for v in c[np.argmin(((c - c.mean(0)) ** 2).sum(1))]]
    return out


def _ratio(a: int, b: int) -> float:
    """a / b, NaN when b is 0."""
    return float(a / b) if b else NAN


def match(ref: np.ndarray, pred: np.ndarray, voxel_ml: float) -> dict:
    """Reference and predicted lesions of boolean tumour masks, matched by the module's overlap rule."""
    rlab, nr = components(ref)
    plab, npred = components(pred)
    rsize, psize = np.bincount(rlab.ravel(), minlength=nr + 1), np.bincount(plab.ravel(), minlength=npred + 1)
    both = (rlab > 0) & (plab > 0)
    pairs, counts = np.unique(np.stack([rlab[both], plab[both]]), axis=1, return_counts=True)
    r_to_p: dict[int, list[int]] = {g: [] for g in range(1, nr + 1)}
    p_to_r: dict[int, list[int]] = {p: [] for p in range(1, npred + 1)}
    inside = np.zeros(nr + 1, np.int64)  # voxels of each reference lesion predicted tumour
    for (g, p), c in zip(pairs.T.tolist(), counts.tolist()):
        r_to_p[g].append(p)
        p_to_r[p].append(g)
        inside[g] += c
    reference = []
    for g, centre in zip(range(1, nr + 1), _centres(rlab, nr)):
        union = int(sum(psize[p] for p in r_to_p[g]))
        ml = float(rsize[g] * voxel_ml)
        reference.append({"id": g, "voxels": int(rsize[g]), "volume_ml": ml, "bin": volume_bin(ml),
                          "detected": bool(r_to_p[g]), "dice": float(2 * inside[g] / (rsize[g] + union)),
                          "predicted": r_to_p[g], "centre": centre})
    predicted = []
    for p, centre in zip(range(1, npred + 1), _centres(plab, npred)):
        ml = float(psize[p] * voxel_ml)
        predicted.append({"id": p, "voxels": int(psize[p]), "volume_ml": ml, "bin": volume_bin(ml),
                          "matched": bool(p_to_r[p]), "reference": p_to_r[p], "centre": centre})
    return {"reference": reference, "predicted": predicted, **_counts(reference, predicted)}


def predicted_only(pred: np.ndarray, voxel_ml: float) -> dict:
    """The predicted lesions of a case without ground truth (matched and counts left out)."""
    plab, npred = components(pred)
    psize = np.bincount(plab.ravel(), minlength=npred + 1)
    predicted = [{"id": p, "voxels": int(psize[p]), "volume_ml": float(psize[p] * voxel_ml),
                  "bin": volume_bin(float(psize[p] * voxel_ml)), "matched": None, "reference": [], "centre": c}
                 for p, c in zip(range(1, npred + 1), _centres(plab, npred))]
    return {"reference": None, "predicted": predicted, "counts": {"predicted": npred}, "recall": NAN,
            "precision": NAN}


def _counts(reference: list[dict], predicted: list[dict]) -> dict:
    """Lesion counts, recall and precision of one case (or of pooled lesion lists)."""
    det = sum(r["detected"] for r in reference)
    hit = sum(p["matched"] for p in predicted)
    counts = {"reference": len(reference), "detected": det, "missed": len(reference) - det,
              "predicted": len(predicted), "matched": hit, "false": len(predicted) - hit}
    return {"counts": counts, "recall": _ratio(det, len(reference)), "precision": _ratio(hit, len(predicted))}


def case_lesions(pred: np.ndarray, ref: np.ndarray | None, spacing) -> dict:
    """Lesions of one labelled case (z, y, x arrays; spacing in mm) and its liver/tumour volumes (ml)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = match(ref == TUMOUR, pred == TUMOUR, voxel_ml) if ref is not None else predicted_only(pred == TUMOUR,
                                                                                                voxel_ml)
    vols = {"prediction": _volumes(pred, voxel_ml)}
    if ref is not None:
        vols["reference"] = _volumes(ref, voxel_ml)
    return {**out, "volumes_ml": vols}


def _volumes(seg: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Liver (label 1) and tumour (label 2) volumes in ml."""
    counts = np.bincount(seg.ravel().astype(np.int64), minlength=3)
    return {"liver": float(counts[1] * voxel_ml), "tumour": float(counts[2] * voxel_ml)}


def overall(per_case: list[dict]) -> dict:
    """Pooled lesion counts, recall and precision over cases, by volume bin, and the mean lesion Dice."""
    reference = [r for c in per_case for r in (c.get("reference") or [])]
    predicted = [p for c in per_case for p in c.get("predicted", []) if p.get("matched") is not None]
    dice = [r["dice"] for r in reference]
    out = {**_counts(reference, predicted),
           "lesion_dice_mean": float(np.mean(dice)) if dice else NAN,  # missed lesions count as 0
           "lesion_dice_mean_detected": float(np.mean([r["dice"] for r in reference if r["detected"]]))
           if any(r["detected"] for r in reference) else NAN}
    out["by_volume"] = {b: _counts([r for r in reference if r["bin"] == b], [p for p in predicted if p["bin"] == b])
                        for b in BINS}
    return out


def section(cases: list[str], per_case: list[dict]) -> dict:
    """The `lesions` section of summary.json: rule, per case (in order) and overall."""
    return {"connectivity": CONNECTIVITY, "bins": list(BINS),
            "rule": "a reference lesion is detected when any of its voxels is predicted tumour; a predicted lesion "
                    "is matched when any of its voxels is reference tumour (split and merged lesions: every "
                    "overlapping lesion counts); lesion Dice against the union of the predicted lesions overlapping it",
            "per_case": [{"case": c, **d} for c, d in zip(cases, per_case)], "overall": overall(per_case)}


def lesion_rows(section_or_cases: dict | list[dict], ids: bool = False) -> list[dict]:
    """One table row per lesion (reference lesions first, then false predicted ones) for every case; `ids` adds
    `predicted_ids`, the predicted lesions a row stands for (those overlapping a reference lesion, or its own)."""
    cases = section_or_cases["per_case"] if isinstance(section_or_cases, dict) else section_or_cases
    rows = []
    for c in cases:
        for r in c.get("reference") or []:
            rows.append({"case": c["case"], "lesion": f"G{r['id']}", "volume_ml": round(r["volume_ml"], 3),
                         "bin": r["bin"], "finding": "detected" if r["detected"] else "missed",
                         "dice": round(r["dice"], 4), "overlaps": " ".join(f"P{p}" for p in r["predicted"]),
                         "centre_zyx": r["centre"], **({"predicted_ids": list(r["predicted"])} if ids else {})})
        for p in c.get("predicted", []):
            if p["matched"] is not True:  # matched ones are listed through their reference lesion
                rows.append({"case": c["case"], "lesion": f"P{p['id']}", "volume_ml": round(p["volume_ml"], 3),
                             "bin": p["bin"], "finding": "false" if p["matched"] is False else "predicted",
                             "dice": NAN, "overlaps": "", "centre_zyx": p["centre"],
                             **({"predicted_ids": [p["id"]]} if ids else {})})
    return rows


def bin_table(overall_: dict) -> list[dict]:
    """Rows per volume bin and all: reference lesions, detected, recall, predicted, matched, precision."""
    rows = []
    for name, d in [*overall_["by_volume"].items(), ("all", overall_)]:
        c = d["counts"]
        rows.append({"lesions (ml)": name, "reference": c["reference"], "detected": c["detected"],
                     "recall": round(d["recall"], 3), "predicted": c["predicted"], "matched": c["matched"],
                     "precision": round(d["precision"], 3)})
    return rows
