"""05_validate's review: a case browser over any prediction folder of a run, and its static report.

A *source* is a list of cases, each a prediction with its CT (and ground truth where there is one):
`validation` / `validation_postprocessed` (a fold's), `crossval` (the listed folds' validation cases
pooled), `test` (a fold's test predictions) or `test_ensemble`; `auto` is `crossval` when folds are
listed, else `validation`. Verdicts (accept / fix / reject + note) go at once, atomically, to
`qa_review.csv` in the folder that holds the case's prediction, so they survive reruns of the notebook
(the browser only reads and adds to it) and a fold's verdicts show in the cross-validation's list.

Headless (`open_review(..., headless=True)`), per prediction folder: an error-map PNG per case
(plots.error_png), the gallery worst-first, and `lesions.csv` (one row per lesion); no widget is built.
Interactive: an ipywidgets + ipyniivue browser (imported lazily, offline), in plots.PALETTE's colours.
"""
from __future__ import annotations

import csv
import getpass
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation import lesions
from . import plots, viz
from ..core.io import Geometry, atomic_path, read_image, read_json
from ..core.layout import PredLayout, RunLayout, case_of_file, case_of_image

VERDICTS = ("accept", "fix", "reject")
SOURCES = ("auto", "validation", "validation_postprocessed", "crossval", "test", "test_ensemble")
REVIEW_FIELDS = ("case", "verdict", "note", "reviewed_at", "reviewer")
SORTS = {"tumour Dice, worst first": ("tumour_dice", False), "liver Dice, worst first": ("liver_dice", False),
         "missed lesions, most first": ("missed", True), "volume error, largest first": ("volume_error", True),
         "case": ("case", False)}
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
def _from_summary(folder: Path) -> tuple[dict, dict]:
    """Dice per case and lesion findings per case from a folder's summary.json (empty without one)."""
    path = PredLayout(folder).summary
    if not path.is_file():
        return {}, {}
    s = read_json(path)
    dice = {case_of_file(e["test"]): (e.get("1", {}).get("Dice", NAN), e.get("2", {}).get("Dice", NAN))
            for e in s["results"]["all"]}
    return dice, {c["case"]: c for c in s.get("lesions", {}).get("per_case", [])}


def _case_findings(c: Case) -> dict:
    """Lesion findings of one case computed from its files (when summary.json has none)."""
    pred, geom = read_image(c.prediction)
    ref = read_image(c.reference)[0].astype(np.uint8) if c.reference else None
    return {"case": c.case, **lesions.case_lesions(pred.astype(np.uint8), ref, geom.spacing)}


def case_rows(cases: list[Case]) -> list[dict]:
    """One row per case: Dice, lesion counts, volume errors and verdict; `findings` holds its lesions.

    `volume_error` is the whole liver's (liver + tumour) predicted volume error in % of the reference's;
    `tumour_error_ml` the tumour burden's in ml. Without ground truth those and the Dice are NaN.
    """
    by_folder: dict[Path, tuple[dict, dict]] = {}
    verdicts = {}
    rows = []
    for c in cases:
        if c.folder not in by_folder:
            by_folder[c.folder] = _from_summary(c.folder) if c.reference else ({}, {})
            verdicts[c.folder] = read_verdicts(c.folder)
        dice, found = by_folder[c.folder]
        f = found.get(c.case) or _case_findings(c)
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
                     "tumour_error_ml": pred_v["tumour"] - ref_v["tumour"] if ref_v else NAN,
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


def case_label(r: dict) -> str:
    """One line of the case list: Dice, missed lesions, volume error, verdict."""
    if np.isnan(r["liver_dice"]):
        text = f"{r['case']}  {r['predicted']} lesions predicted  tumour {r['tumour_ml']:.1f} ml"
    else:
        text = (f"{r['case']}  liver {r['liver_dice']:.3f}  tumour {r['tumour_dice']:.3f}  "
                f"missed {r['missed']}/{r['lesions']}  vol {r['volume_error']:+.1f} %")
    stale = ", made before this prediction" if r.get("stale") else ""
    return text + (f"  [{r['verdict']}{stale}]" if r["verdict"] else "")


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
        picked = plots.worst_first([r for r in rows if r["case"] in mine])  # case names are unique in a source
        pred = PredLayout(folder)
        items = [{"case": r["case"], "image": mine[r["case"]].image, "reference": mine[r["case"]].reference,
                  "prediction": mine[r["case"]].prediction, "png": pred.qa(r["case"]), "caption": case_label(r)}
                 for r in picked]
        plots.qa_pictures(items, pred.gallery)
        table = lesions.lesion_rows([r["findings"] for r in picked])
        with atomic_path(PredLayout(folder).lesions) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["case"])
            writer.writeheader()
            writer.writerows(table)
        out[folder] = {"gallery": pred.gallery, "lesions": PredLayout(folder).lesions, "pictures": len(items)}
    return out


def open_review(run_dir: str | Path, source: str = "auto", fold: int = 0, folds: list[int] | tuple = (),
                show_case: str = "", headless: bool = False, height: int = 0) -> Any:
    """The review of a source: in headless runs the static report (shown, None returned), else the browser
    (its canvas `height` px; 0: the height at which the three planes fill the width)."""
    from IPython.display import Image, display

    cases = cases_of(run_dir, source, fold, folds)
    if not cases:
        raise FileNotFoundError(f"review: no predictions for source {source!r} in {run_dir}")
    rows = case_rows(cases)
    if headless:
        import pandas as pd

        written = write_static(cases, rows)
        display(pd.DataFrame([{k: v for k, v in r.items() if k != "findings"} for r in plots.worst_first(rows)]))
        display(pd.DataFrame(lesions.lesion_rows([r["findings"] for r in rows])))
        for w in written.values():
            display(Image(filename=str(w["gallery"])))
        return None
    return Browser(cases, rows, show_case, height).widget


# ----------------------------------------------------------------------------- the browser (interactive only)
MODES = {"errors": "error map", "reference": "ground truth only", "prediction": "prediction only"}


def _legend(mode: str) -> str:
    """HTML swatches of the colours the current mode shows."""
    items = ([(n, c) for n, c in plots.ERRORS.values()] if mode == "errors"
             else [("liver", plots.OVERLAY[1]), ("tumour", plots.OVERLAY[2])])
    return " ".join(f'<span style="display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;'
                    f'background:rgb({",".join(str(round(255 * v)) for v in c)})"></span>{n}' for n, c in items)


def planes_height(geom: Geometry, width: int = 980, grid: bool = False) -> int:
    """Canvas height (px) at which the planes fill a `width` px canvas: in a row (axial, coronal, sagittal side by
    side: (x + x + y) mm wide, max(y, z) high) or in a 2 x 2 grid ((x + y) mm wide, (y + z) high)."""
    z, y, x = (n * s for n, s in zip(geom.shape, geom.spacing))
    aspect = (y + z) / (x + y) if grid else max(y, z) / (2 * x + y)
    return int(np.clip(width * aspect, 260, 720))


class Browser:
    """The case browser: list, NiiVue planes (+ 3D), modes, lesion jumps and verdicts (see open_review)."""

    def __init__(self, cases: list[Case], rows: list[dict], show_case: str = "", height: int = 0) -> None:
        import ipywidgets as w

        self.cases, self.rows = {c.case: c for c in cases}, {r["case"]: r for r in rows}
        first = self.cases[show_case] if show_case in self.cases else cases[0]
        self.height = height or planes_height(read_image(first.prediction)[1])
        self.sort = w.Dropdown(options=list(SORTS), description="sort by", layout=w.Layout(width="330px"))
        self.list = w.Select(rows=min(8, len(rows)), layout=w.Layout(width="100%"))
        self.prev, self.next = w.Button(description="< previous"), w.Button(description="next >")
        modes = [m for m in MODES if first.reference or m == "prediction"]
        self.mode = w.ToggleButtons(options=[(MODES[m], m) for m in modes], value=modes[0])
        self.three_d = w.ToggleButton(description="3D view", value=False)
        self.worst = w.Button(description="largest error", disabled=not first.reference)
        self.lesion_list = w.Select(rows=5, description="lesions", layout=w.Layout(width="100%"))
        self.legend = w.HTML(_legend(self.mode.value))
        self.verdict = w.ToggleButtons(options=list(VERDICTS), value=None, style={"button_width": "80px"})
        self.note = w.Text(placeholder="note", continuous_update=False, layout=w.Layout(flex="1 1 auto"))
        self.save = w.Button(description="save verdict", button_style="primary")
        self.status, self.summary = w.HTML(), w.HTML()
        self.nv = viz.niivue_widget(self.height)
        self.nv3d = None
        self.views = w.HBox([self.nv], layout=w.Layout(width="100%"))
        self.widget = w.VBox([w.HBox([self.sort, self.prev, self.next]), self.list, self.views,
                              w.HBox([self.mode, self.three_d, self.worst]), self.legend, self.lesion_list,
                              w.HBox([w.Label("verdict"), self.verdict, self.note, self.save]), self.status,
                              self.summary])
        self._busy, self.current, self.focus, self.spots = True, first.case, None, []
        self._fill_list()
        self._wire()
        self._busy = False
        self.show(first.case)

    def _wire(self) -> None:
        """Connect the controls to their actions."""
        self.sort.observe(lambda _: self._fill_list(), "value")
        self.list.observe(lambda ch: None if self._busy or ch["new"] is None else self.show(ch["new"]), "value")
        self.prev.on_click(lambda _: self.step(-1))
        self.next.on_click(lambda _: self.step(1))
        self.mode.observe(lambda _: self._apply_mode(), "value")
        self.three_d.observe(lambda _: self._toggle_3d(), "value")
        self.worst.on_click(lambda _: self.jump(self.focus))
        self.lesion_list.observe(lambda ch: None if self._busy or ch["new"] is None
                                 else self.jump(self.spots[ch["new"]]), "value")
        self.verdict.observe(lambda _: None if self._busy else self.record(), "value")
        self.note.observe(lambda _: None if self._busy or not self.verdict.value else self.record(), "value")
        self.save.on_click(lambda _: self.record())

    def _fill_list(self) -> None:
        """(Re)write the case list in the chosen order, keeping the selection."""
        was, self._busy = self._busy, True
        ordered = sort_rows(list(self.rows.values()), self.sort.value)
        self.list.options = [(case_label(r), r["case"]) for r in ordered]
        self.list.value = self.current
        self._busy = was
        self.summary.value = "verdicts: " + ", ".join(f"{s['verdict']} {s['cases']}" for s in
                                                      verdict_summary(list(self.cases.values())))

    def step(self, by: int) -> None:
        """Show the next (+1) or previous (-1) case of the list."""
        order = [v for _, v in self.list.options]
        self.show(order[(order.index(self.current) + by) % len(order)])

    def show(self, case: str) -> None:
        """Load a case: CT, error map, ground truth and prediction; lesions; its verdict."""
        c, r = self.cases[case], self.rows[case]
        self.current = case
        pred, geom = read_image(c.prediction)
        pred = pred.astype(np.uint8)
        ref = read_image(c.reference)[0].astype(np.uint8) if c.reference else None
        self.geom, self.labels = geom, {"prediction": pred, "reference": ref}
        # each overlay starts with its final opacity: a change sent while the viewer still loads it can be lost
        vols: list = [viz.ct_volume(c.image), viz.label_volume(c.prediction, opacity=self._opacity("prediction"))]
        if ref is not None:
            self.labels["errors"] = plots.error_map(ref, pred)
            vols += [viz.label_volume(c.reference, opacity=self._opacity("reference")),
                     viz.label_volume(data=viz.nifti_bytes(self.labels["errors"], c.prediction),
                                      name=f"{case}_errors.nii.gz", lut=viz.error_lut(), opacity=self._opacity("errors"))]
        self.nv.load_volumes(vols)
        self.focus = plots.error_focus(ref, pred) if ref is not None else plots.focus_point(pred)
        self._fill_lesions(r["findings"])
        self._busy = True
        self.list.value = case
        v = read_verdicts(c.folder).get(case, {})
        self.verdict.value = v.get("verdict") or None
        self.note.value = v.get("note", "")
        self._busy = False
        self.status.value = f"<b>{case}</b> ({r['folder']})" + (f": {v['verdict']} on {v['reviewed_at']}" if v else "")
        self.legend.value = _legend(self.mode.value)
        if self.three_d.value:
            self._load_meshes()
        self.jump(self.focus)

    def _fill_lesions(self, found: dict) -> None:
        """The lesion table of the case as a list; choosing a row moves the crosshair to that lesion."""
        rows = lesions.lesion_rows([found])
        self.spots = [tuple(x["centre_zyx"]) for x in rows]
        was, self._busy = self._busy, True
        self.lesion_list.options = [(f"{x['lesion']}  {x['volume_ml']:.2f} ml  {x['finding']}" +
                                     ("" if np.isnan(x["dice"]) else f"  Dice {x['dice']:.3f}"), i)
                                    for i, x in enumerate(rows)]
        self.lesion_list.value = None
        self._busy = was

    def jump(self, voxel: tuple[int, int, int] | None) -> None:
        """Move the crosshair (all three planes) to a (z, y, x) voxel."""
        if voxel is not None:
            self.nv.scene.crosshair_pos = viz.crosshair_frac(voxel, self.geom)

    def _opacity(self, overlay: str) -> float:
        """Opacity of an overlay volume: shown in its mode, hidden otherwise."""
        return 0.55 if overlay == self.mode.value else 0.0

    def _apply_mode(self) -> None:
        """Show one overlay (error map, ground truth or prediction); refresh the legend and the 3D view."""
        for name, i in {"prediction": 1, "reference": 2, "errors": 3}.items():
            if i < len(self.nv.volumes):
                self.nv.volumes[i].opacity = self._opacity(name)
        self.legend.value = _legend(self.mode.value)
        if self.three_d.value:
            self._load_meshes()

    def _toggle_3d(self) -> None:
        """Show or hide the 3D view (surface meshes) beside the planes, which change from a row to a grid."""
        from ipyniivue import MultiplanarType

        on = self.three_d.value
        height = planes_height(self.geom, 490, grid=True) if on else self.height  # half the width each
        if on and self.nv3d is None:
            self.nv3d = viz.niivue_widget(height, render=True)
        self.nv.height = height
        self.nv.opts.multiplanar_layout = MultiplanarType.GRID if on else MultiplanarType.ROW
        self.views.children = [self.nv, self.nv3d] if on else [self.nv]
        if on:
            self.nv3d.height = height
            self._load_meshes()

    def _load_meshes(self) -> None:
        """Surfaces of what the current mode shows, in the palette's colours (errors: the tumours' only)."""
        if self.mode.value == "errors":
            codes = plots.tumour_errors(self.labels["reference"], self.labels["prediction"])
            colours = {k: c for k, (_, c) in plots.ERRORS.items()}
            names = {1: "liver", 2: "agreed tumour", 3: "missed tumour", 4: "invented tumour"}
        else:
            codes, colours, names = self.labels[self.mode.value], plots.OVERLAY, viz.LABEL_NAMES
        self.nv3d.load_meshes(viz.meshes(codes, self.geom, colours, names))

    def record(self) -> None:
        """Write the shown case's verdict and note to its folder's qa_review.csv now; refresh the list."""
        c = self.cases[self.current]
        if not self.verdict.value:
            self.status.value = "choose accept, fix or reject first"
            return
        row = write_verdict(c.folder, c.case, self.verdict.value, self.note.value)
        self.rows[c.case].update(verdict=row["verdict"], note=row["note"], stale=False)
        self._fill_list()
        self.status.value = f"<b>{c.case}</b>: {row['verdict']} saved to {review_csv(c.folder)}"
