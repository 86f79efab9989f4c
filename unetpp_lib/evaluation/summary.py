"""A prediction folder's summary.json read back per case (Dice, lesion findings), and the QA's worst-first order."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.io import read_json
from ..core.layout import PredLayout, case_of_file

NAN = float("nan")


def case_dice(summary: dict) -> dict[str, tuple[float, float]]:
    """(liver Dice, tumour Dice) by case of a summary.json; NaN for a label a case's entry lacks."""
    return {case_of_file(e["test"]): (e.get("1", {}).get("Dice", NAN), e.get("2", {}).get("Dice", NAN))
            for e in summary["results"]["all"]}


def folder_results(folder: str | Path) -> tuple[dict, dict]:
    """(Dice by case, lesion findings by case) of a prediction folder's summary.json; empty without one."""
    path = PredLayout(folder).summary
    if not path.is_file():
        return {}, {}
    s = read_json(path)
    return case_dice(s), {c["case"]: c for c in s.get("lesions", {}).get("per_case", [])}


def dice_rows(summary: dict) -> list[dict]:
    """One row per case of a summary.json: case, tumour_dice, liver_dice."""
    return [{"case": case, "tumour_dice": tumour, "liver_dice": liver}
            for case, (liver, tumour) in case_dice(summary).items()]


def worst_first(rows: list[dict]) -> list[dict]:
    """Rows sorted worst-first by tumour Dice, then liver Dice; cases without tumour anywhere (NaN) last."""
    def key(r: dict) -> tuple:
        t, liver = r.get("tumour_dice", NAN), r.get("liver_dice", NAN)
        return (bool(np.isnan(t)), 0.0 if np.isnan(t) else t, 0.0 if np.isnan(liver) else liver)
    return sorted(rows, key=key)
