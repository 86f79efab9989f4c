"""05_validate's review: the cases of any prediction folder of a run, their verdicts, and the static report.

A *source* is a list of cases, each a prediction with its CT (and ground truth where there is one):
`validation` / `validation_postprocessed` (a fold's), `crossval` (the listed folds' validation cases
pooled), `test` (a fold's test predictions) or `test_ensemble`; `auto` is `crossval` when folds are
listed, else `validation`. Verdicts (accept / fix / reject + note) go at once, atomically, to
`qa_review.csv` in the folder that holds the case's prediction, so they survive reruns of the notebook
(the browser only reads and adds to it) and a fold's verdicts show in the cross-validation's list.

Where inference saved uncertainty maps (`<folder>/uncertainty/`, PredLayout.uncertainty), each case also has a
*doubt*: evaluation.uncertainty.case_score, the uncertain volume per predicted volume (summary.json's uncertainty
section where scored, else computed from the maps; NaN without maps), and each predicted lesion its probability
and uncertainty (0-1). Predictions without ground truth whose cases all have a doubt are listed most doubtful first.

The static report (`write_static`; `show_report` writes and shows it in headless runs), per prediction
folder: an error-map PNG per case (plots.error_png, with the uncertainty heat map where there are maps), the
gallery worst-first (most doubtful first where `default_sort` says so), and `lesions.csv` (one row per lesion,
with the predicted lesion's probability and uncertainty where known). The interactive case browser over the
same cases and verdicts is browser.py's.
"""
from __future__ import annotations

import csv
import getpass
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import atomic_path, read_image, read_json
from ..core.layout import PredLayout, RunLayout, case_of_image
from ..evaluation import lesions, uncertainty
from ..evaluation.summary import folder_results, worst_first
from . import plots

VERDICTS = ("accept", "fix", "reject")
SOURCES = ("auto", "validation", "validation_postprocessed", "crossval", "test", "test_ensemble")
REVIEW_FIELDS = ("case", "verdict", "note", "reviewed_at", "reviewer")
DOUBT = "doubt, most doubtful first"
SORTS = {"tumour Dice, worst first": ("tumour_dice", False), "liver Dice, worst first": ("liver_dice", False),
         "missed lesions, most first": ("missed", True), "volume error, largest first": ("volume_error", True),
         DOUBT: ("doubt", True), "case": ("case", False)}
CONFIDENCE = ("probability", "uncertainty")  # of a predicted lesion (evaluation.uncertainty.lesion_confidence), 0-1
NAN = float("nan")
TIME = "%Y-%m-%d %H:%M:%S"  # reviewed_at, local time


@dataclass(frozen=True)
class Case:
    """One prediction to review: its files, and the folder whose qa_review.csv holds its verdict."""

    case: str
    image: Path
    prediction: Path
    reference: Path | None
    folder: Path


def review_csv(folder: str | Path) -> Path:
    """`qa_review.csv` of a prediction folder."""
    return PredLayout(folder).verdicts


def cases_of(run_dir: str | Path, source: str = "auto", fold: int = 0, folds: list[int] | tuple = ()) -> list[Case]:
    """The cases of a source (see the module docstring) that have a prediction file."""
    run = RunLayout(run_dir)
    if source == "auto":
        source = "crossval" if folds else "validation"
    if source not in SOURCES:
        raise ValueError(f"review source {source!r}: use one of {SOURCES}")
    if source in ("test", "test_ensemble"):
        pred = run.test_ensemble if source == "test_ensemble" else run.fold(fold).test_predictions
        return [Case(case_of_image(im), im, pred.case(case_of_image(im)), None, pred.root)
                for im in run.raw.test_images() if pred.case(case_of_image(im)).is_file()]
    splits = read_json(run.pre.splits)
    out = []
    for k in (list(folds) if source == "crossval" else [fold]):
        pred = run.fold(k).predictions("validation" if source == "crossval" else source)
        out += [Case(c, run.raw.image(c), pred.case(c), run.raw.label(c), pred.root)
                for c in splits[k]["val"] if pred.case(c).is_file()]
    return out


# ----------------------------------------------------------------------------- the case table
def _case_findings(c: Case) -> dict:
    """Lesion findings of one case computed from its files (when summary.json has none)."""
    pred, geom = read_image(c.prediction)
    ref = read_image(c.reference)[0].astype(np.uint8) if c.reference else None
    return {"case": c.case, **lesions.case_lesions(pred.astype(np.uint8), ref, geom.spacing)}


def _float(v: Any) -> float:
    """A JSON number as a float (None: NaN)."""
    return NAN if v is None else float(v)


def folder_doubts(folder: str | Path) -> dict[str, float]:
    """The case scores of a folder's summary.json uncertainty section by case (empty without one)."""
    path = PredLayout(folder).summary
    if not path.is_file():
        return {}
    per_case = (read_json(path).get("uncertainty") or {}).get("per_case") or []
    return {u["case"]: _float(u.get("score")) for u in per_case}


def has_maps(c: Case) -> bool:
    """Whether the case's prediction has its uncertainty (entropy) map: what the heat map and the scores read."""
    return uncertainty.has_maps(c.folder, c.case, ("entropy",))


def _with_confidence(f: dict, confidences: list[dict]) -> dict:
    """Findings whose predicted lesions carry their probability and uncertainty (matched by component id)."""
    by_id = {d["id"]: d for d in confidences}
    return {**f, "predicted": [{**p, **{k: by_id[p["id"]][k] for k in CONFIDENCE}} if p["id"] in by_id else p
                               for p in f["predicted"]]}


def _uncertainty(c: Case, f: dict, score: float | None) -> tuple[float, dict]:
    """(doubt, findings) of a case: the score and lesion confidences from summary.json where there, else
    computed from the case's uncertainty maps; NaN and the findings as they are without maps."""
    known = all(k in p for p in f["predicted"] for k in CONFIDENCE)
    if (score is not None and known) or not has_maps(c):
        return (NAN if score is None else score), f
    maps = uncertainty.read_maps(c.folder, c.case)
    if maps is None:
        return (NAN if score is None else score), f
    pred, geom = read_image(c.prediction)
    pred = pred.astype(np.uint8)
    if score is None:
        score = float(uncertainty.case_score(maps["entropy"], pred, geom.spacing))
    if not known and "confidence" in maps:
        f = _with_confidence(f, uncertainty.lesion_confidence(pred, maps["confidence"], maps["entropy"]))
    return score, f


def case_rows(cases: list[Case]) -> list[dict]:
    """One row per case: Dice, lesion counts, volume errors, doubt and verdict; `findings` holds its lesions.

    `volume_error` is the whole liver's (liver + tumour) predicted volume error in % of the reference's;
    `tumour_error_ml` the tumour burden's in ml. Without ground truth those and the Dice are NaN. `doubt` is the
    case's uncertainty score (module docstring), NaN without uncertainty maps.
    """
    by_folder: dict[Path, tuple[dict, dict]] = {}
    verdicts, doubts = {}, {}
    rows = []
    for c in cases:
        if c.folder not in by_folder:
            by_folder[c.folder] = folder_results(c.folder) if c.reference else ({}, {})
            verdicts[c.folder], doubts[c.folder] = read_verdicts(c.folder), folder_doubts(c.folder)
        dice, found = by_folder[c.folder]
        doubt, f = _uncertainty(c, found.get(c.case) or _case_findings(c), doubts[c.folder].get(c.case))
        counts, vols = f["counts"], f["volumes_ml"]
        ref_v, pred_v = vols.get("reference"), vols["prediction"]
        liver = (ref_v["liver"] + ref_v["tumour"]) if ref_v else 0.0
        v = verdicts[c.folder].get(c.case, {})
        # predicted again after the verdict (reviewed_at is to the second, hence the second's grace)
        stale = bool(v) and c.prediction.stat().st_mtime > time.mktime(time.strptime(v["reviewed_at"], TIME)) + 1
        rows.append({"case": c.case, "folder": c.folder.parent.name + "/" + c.folder.name,
                     "liver_dice": dice.get(c.case, (NAN, NAN))[0], "tumour_dice": dice.get(c.case, (NAN, NAN))[1],
                     "lesions": counts.get("reference", NAN), "missed": counts.get("missed", NAN),
                     "false": counts.get("false", NAN), "predicted": counts["predicted"],
                     "volume_error": 100 * (pred_v["liver"] + pred_v["tumour"] - liver) / liver if liver else NAN,
                     "tumour_ml": pred_v["tumour"],
                     "tumour_error_ml": pred_v["tumour"] - ref_v["tumour"] if ref_v else NAN, "doubt": doubt,
                     "verdict": v.get("verdict", ""), "note": v.get("note", ""), "stale": stale, "findings": f})
    return rows


def sort_rows(rows: list[dict], by: str) -> list[dict]:
    """Rows sorted by one of SORTS (volume error by its size); missing values (NaN) last."""
    key, descending = SORTS[by]

    def value(r: dict) -> Any:
        v = r[key]
        if key == "case":
            return v
        v = abs(v) if key == "volume_error" else v
        return -v if descending else v
    missing = [r for r in rows if key != "case" and np.isnan(r[key])]
    return sorted([r for r in rows if r not in missing], key=value) + missing


def _has_reference(r: dict) -> bool:
    """Whether a case row was scored against ground truth (its reference lesion count is known)."""
    return not np.isnan(r["lesions"])


def default_sort(rows: list[dict]) -> str:
    """The list's first order: most doubtful first when no case has ground truth and every case has a doubt,
    else SORTS' first (tumour Dice, worst first)."""
    if rows and all(not _has_reference(r) and np.isfinite(r.get("doubt", NAN)) for r in rows):
        return DOUBT
    return next(iter(SORTS))


def report_order(rows: list[dict]) -> list[dict]:
    """Rows in the static report's order: most doubtful first where that is the default sort, else worst-first."""
    return sort_rows(rows, DOUBT) if default_sort(rows) == DOUBT else worst_first(rows)


def case_label(r: dict) -> str:
    """One line of the case list: Dice, missed lesions, volume error, doubt (where known), verdict."""
    if np.isnan(r["liver_dice"]):
        text = f"{r['case']}  {r['predicted']} lesions predicted  tumour {r['tumour_ml']:.1f} ml"
    else:
        text = (f"{r['case']}  liver {r['liver_dice']:.3f}  tumour {r['tumour_dice']:.3f}  "
                f"missed {r['missed']}/{r['lesions']}  vol {r['volume_error']:+.1f} %")
    if np.isfinite(r.get("doubt", NAN)):
        text += f"  doubt {r['doubt']:.3f}"
    stale = ", made before this prediction" if r.get("stale") else ""
    return text + (f"  [{r['verdict']}{stale}]" if r["verdict"] else "")


def lesion_table(findings: list[dict]) -> list[dict]:
    """lesions.lesion_rows with each lesion's `probability` and `uncertainty` (0-1) where its case's predicted
    lesions carry them: a predicted lesion's own, a reference lesion's those of the largest predicted lesion
    overlapping it (NaN when missed). Without any, the rows are lesion_rows' as they are."""
    rows = lesions.lesion_rows(findings, ids=True)
    known = {f["case"]: {p["id"]: p for p in f.get("predicted", [])} for f in findings
             if f.get("predicted") and all(k in p for p in f["predicted"] for k in CONFIDENCE)}
    for r in rows:
        ids = r.pop("predicted_ids")
        if known:
            mine = known.get(r["case"], {})
            picked = max((mine[i] for i in ids if i in mine), key=lambda p: p["voxels"], default=None)
            r.update({k: NAN if picked is None else round(float(picked[k]), 4) for k in CONFIDENCE})
    return rows


# ----------------------------------------------------------------------------- verdicts
def read_verdicts(folder: str | Path) -> dict[str, dict]:
    """The verdicts of a prediction folder by case (empty when none was written)."""
    path = review_csv(folder)
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def write_verdict(folder: str | Path, case: str, verdict: str, note: str = "") -> dict:
    """Record (or replace) a case's verdict in the folder's qa_review.csv, atomically; returns its row."""
    if verdict not in (*VERDICTS, ""):
        raise ValueError(f"verdict {verdict!r}: use one of {VERDICTS}")
    rows = read_verdicts(folder)
    rows[case] = {"case": case, "verdict": verdict, "note": note.strip(),
                  "reviewed_at": time.strftime(TIME), "reviewer": getpass.getuser()}
    with atomic_path(review_csv(folder)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REVIEW_FIELDS)
        writer.writeheader()
        writer.writerows(rows[c] for c in sorted(rows))
    return rows[case]


def verdict_summary(cases: list[Case]) -> list[dict]:
    """How many cases of a source are accepted, to fix, rejected or not yet reviewed, with their names."""
    marks = {}
    for c in cases:
        marks[c.case] = read_verdicts(c.folder).get(c.case, {}).get("verdict", "") or "not reviewed"
    return [{"verdict": v, "cases": sum(m == v for m in marks.values()),
             "which": " ".join(sorted(c for c, m in marks.items() if m == v))}
            for v in (*VERDICTS, "not reviewed")]


# ----------------------------------------------------------------------------- the static report
def write_static(cases: list[Case], rows: list[dict]) -> dict[Path, dict]:
    """Per prediction folder: an error-map PNG per case, the gallery worst-first and lesions.csv."""
    out = {}
    for folder in dict.fromkeys(c.folder for c in cases):
        mine = {c.case: c for c in cases if c.folder == folder}
        picked = report_order([r for r in rows if r["case"] in mine])  # case names are unique in a source
        pred = PredLayout(folder)
        items = [{"case": r["case"], "image": mine[r["case"]].image, "reference": mine[r["case"]].reference,
                  "prediction": mine[r["case"]].prediction, "png": pred.qa(r["case"]), "caption": case_label(r)}
                 for r in picked]
        plots.qa_pictures(items, pred.gallery)
        table = lesion_table([r["findings"] for r in picked])
        with atomic_path(PredLayout(folder).lesions) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["case"])
            writer.writeheader()
            writer.writerows(table)
        out[folder] = {"gallery": pred.gallery, "lesions": PredLayout(folder).lesions, "pictures": len(items)}
    return out


def show_report(cases: list[Case], rows: list[dict]) -> None:
    """The headless review: the static report written (write_static), then shown: the case table in its order,
    the lesion table and each folder's gallery."""
    import pandas as pd
    from IPython.display import Image, display

    written = write_static(cases, rows)
    hide = {"findings"} | ({"doubt"} if all(np.isnan(r["doubt"]) for r in rows) else set())  # no maps: as before
    display(pd.DataFrame([{k: v for k, v in r.items() if k not in hide} for r in report_order(rows)]))
    display(pd.DataFrame(lesion_table([r["findings"] for r in rows])))
    for w in written.values():
        display(Image(filename=str(w["gallery"])))
