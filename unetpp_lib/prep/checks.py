"""What 01_convert verifies in each case's files, and the error that lists every problem found.

Each problem names the case, the file, what is wrong and the fix; `DatasetError` gathers them all, so one
run reports every defect of a dataset at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.io import Geometry
from .transforms import values_present

FIX_REEXTRACT = "extract the file again from the original archive (Task03_Liver.tar) and check its checksum"
FIX_GEOMETRY = "re-export the label from the image it was drawn on, so both share one header"


class DatasetError(ValueError):
    """A dataset with problems; the message lists case, file, problem and fix for each."""

    def __init__(self, source: str, problems: list["Problem"]):
        self.problems = problems
        cases = sorted({p.case for p in problems})
        lines = [f"{len(problems)} problem(s) in {len(cases)} case(s) of {source}:"]
        lines += [f"  {p.case}  {p.file}: {p.problem}\n      fix: {p.fix}" for p in problems]
        if any(p.case != "-" for p in problems):
            lines.append("Nothing of these cases was written; fix them and run again "
                         "(cases already converted are kept and skipped).")
        super().__init__("\n".join(lines))


@dataclass
class Problem:
    """One defect of one file."""

    case: str
    file: str
    problem: str
    fix: str


def check_image(case: str, file: str, img: np.ndarray) -> list[Problem]:
    """NaN or infinite voxels in an image."""
    if np.issubdtype(img.dtype, np.floating):
        bad = int(img.size - np.count_nonzero(np.isfinite(img)))
        if bad:
            return [Problem(case, file, f"{bad} NaN/Inf voxel(s) in the image",
                            "replace them (e.g. with -1024 HU, air) or drop the case")]
    return []


def check_label(case: str, file: str, lab: np.ndarray, allowed: list[int]
                ) -> tuple[np.ndarray | None, list[int], list[Problem]]:
    """(label as uint8, the classes present) if it holds only whole, declared class numbers; else the problems."""
    if np.issubdtype(lab.dtype, np.floating):
        if not np.isfinite(lab).all():
            return None, [], [Problem(case, file, "NaN/Inf values in the label", "re-export the label as integers")]
        rounded = np.rint(lab)
        if np.abs(lab - rounded).max(initial=0) > 1e-3:
            return None, [], [Problem(case, file, "non-integer label values",
                                      "labels must be whole class numbers; re-export as integers")]
        lab = rounded
    lo, hi = lab.min(initial=0), lab.max(initial=0)
    if lo < 0 or hi > 255:
        values = set(np.unique(lab).astype(int).tolist())
    else:
        lab = lab.astype(np.uint8, copy=False)
        values = set(values_present(lab))
    unknown = sorted(values - set(allowed))
    if unknown:
        return None, [], [Problem(case, file, f"label values {unknown} not declared in dataset.json labels {allowed}",
                                  "relabel these voxels, or declare the classes in dataset.json 'labels'")]
    return lab.astype(np.uint8, copy=False), sorted(values), []


def check_pair(case: str, file: str, img: Geometry, lab: Geometry, tol_mm: float) -> list[Problem]:
    """Image and label must share shape, spacing, origin and direction (within `tol_mm` / 1e-4)."""
    out = []
    if img.shape != lab.shape:
        out.append(f"shape {list(lab.shape)} != image {list(img.shape)}")
    if not np.allclose(img.spacing, lab.spacing, rtol=1e-5, atol=tol_mm):
        out.append(f"spacing {list(np.round(lab.spacing, 5))} != image {list(np.round(img.spacing, 5))} mm")
    if not np.allclose(img.origin, lab.origin, rtol=1e-5, atol=tol_mm):
        out.append(f"origin {list(np.round(lab.origin, 3))} != image {list(np.round(img.origin, 3))} mm")
    if not np.allclose(img.direction, lab.direction, atol=1e-4):
        out.append(f"direction {list(np.round(lab.direction, 4))} != image {list(np.round(img.direction, 4))}")
    return [Problem(case, file, "label does not match its image: " + "; ".join(out), FIX_GEOMETRY)] if out else []
