"""05_validate's case browser (ipywidgets + ipyniivue, imported lazily, offline) and `open_review`, which opens it.

The browser goes through a source's cases (review.py: the cases, their table and verdicts): NiiVue's planes
(and a 3D view) with the error map, ground truth or prediction in plots.PALETTE's colours, jumps to the largest
error or to a lesion, and a verdict per case written at once to qa_review.csv. A case whose prediction has
uncertainty maps also offers its entropy map as a heat map (plots.HEAT_STOPS over 0-100 %, transparent below
plots.HEAT_FLOOR), a jump to its most uncertain voxel, and each predicted lesion's probability and uncertainty in
the lesion list. In headless runs `open_review` writes and shows the static report instead (review.show_report);
no widget is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import Geometry, read_image
from ..core.layout import PredLayout
from ..evaluation.errors import error_focus, error_map, focus_point, tumour_errors
from . import plots, viz
from .review import (DOUBT, SORTS, VERDICTS, Case, case_label, case_rows, cases_of, default_sort, has_maps,
                     lesion_table, read_verdicts, review_csv, show_report, sort_rows, verdict_summary, write_verdict)


def open_review(run_dir: str | Path, source: str = "auto", fold: int = 0, folds: list[int] | tuple = (),
                show_case: str = "", headless: bool = False, height: int = 0) -> Any:
    """The review of a source: in headless runs the static report (shown, None returned), else the browser
    (its canvas `height` px; 0: the height at which the three planes fill the width)."""
    cases = cases_of(run_dir, source, fold, folds)
    if not cases:
        raise FileNotFoundError(f"review: no predictions for source {source!r} in {run_dir}")
    rows = case_rows(cases)
    if headless:
        show_report(cases, rows)
        return None
    return Browser(cases, rows, show_case, height).widget


MODES = {"errors": "error map", "reference": "ground truth only", "prediction": "prediction only",
         "uncertainty": "uncertainty"}
DOUBTFUL_PCT = 50  # the 3D view of the uncertainty mode: the surface of the voxels at least this uncertain


def case_modes(reference: bool, maps: bool) -> list[str]:
    """The overlays a case offers: error map and ground truth with a reference, the prediction, and its
    uncertainty (entropy) map with uncertainty maps."""
    return [m for m in MODES if (reference or m not in ("errors", "reference")) and (maps or m != "uncertainty")]


def _legend(mode: str) -> str:
    """HTML swatches of the colours the current mode shows (the uncertainty mode: its colour bar)."""
    if mode == "uncertainty":
        bar = (f'<span style="display:inline-block;width:180px;height:12px;margin:0 6px;vertical-align:middle;'
               f'background:{viz.heat_css()}"></span>')
        return (f'<span style="margin-left:10px">uncertainty (entropy, % of ln C): 0 %{bar}100 %'
                f' &nbsp;(below {plots.HEAT_FLOOR} % not coloured)</span>')
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
        order = default_sort(rows)
        first = (self.cases[show_case] if show_case in self.cases else  # test sources: the most doubtful first
                 self.cases[sort_rows(rows, DOUBT)[0]["case"]] if order == DOUBT else cases[0])
        self.height = height or planes_height(read_image(first.prediction)[1])
        self.sort = w.Dropdown(options=list(SORTS), value=order, description="sort by", layout=w.Layout(width="330px"))
        self.list = w.Select(rows=min(8, len(rows)), layout=w.Layout(width="100%"))
        self.prev, self.next = w.Button(description="< previous"), w.Button(description="next >")
        modes = case_modes(first.reference is not None, has_maps(first))
        self.mode = w.ToggleButtons(options=[(MODES[m], m) for m in modes], value=modes[0],
                                    style={"button_width": "auto"})  # four modes and three buttons fit a row
        self.three_d = w.ToggleButton(description="3D view", value=False)
        self.worst = w.Button(description="largest error", disabled=not first.reference)
        self.uncertain = w.Button(description="most uncertain", disabled=not has_maps(first))
        self.where = w.HTML()
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
                              w.HBox([self.mode, self.three_d, self.worst, self.uncertain]),
                              w.HBox([self.legend, self.where]), self.lesion_list,
                              w.HBox([w.Label("verdict"), self.verdict, self.note, self.save]), self.status,
                              self.summary])
        self._busy, self.current, self.focus, self.spots = True, first.case, None, []
        self.doubtful, self.entropy, self.overlays = None, None, {}
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
        self.mode.observe(lambda _: None if self._busy else self._apply_mode(), "value")
        self.three_d.observe(lambda _: self._toggle_3d(), "value")
        self.worst.on_click(lambda _: self.jump(self.focus))
        self.uncertain.on_click(lambda _: self.jump(self.doubtful))
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

    def _offer_modes(self, c: Case) -> None:
        """The mode buttons of a case (case_modes), keeping the current mode where the case offers it."""
        modes = case_modes(c.reference is not None, has_maps(c))
        if [v for _, v in self.mode.options] != modes:
            was, self._busy = self._busy, True
            keep = self.mode.value if self.mode.value in modes else modes[0]
            self.mode.options = [(MODES[m], m) for m in modes]
            self.mode.value = keep
            self._busy = was
        self.uncertain.disabled = "uncertainty" not in modes

    def show(self, case: str) -> None:
        """Load a case: CT, error map, ground truth, prediction and uncertainty map; lesions; its verdict."""
        c, r = self.cases[case], self.rows[case]
        self.current = case
        self._offer_modes(c)
        pred, geom = read_image(c.prediction)
        pred = pred.astype(np.uint8)
        ref = read_image(c.reference)[0].astype(np.uint8) if c.reference else None
        self.geom, self.labels = geom, {"prediction": pred, "reference": ref}
        # each overlay starts with its final opacity: a change sent while the viewer still loads it can be lost
        vols: list = [viz.ct_volume(c.image), viz.label_volume(c.prediction, opacity=self._opacity("prediction"))]
        self.overlays = {"prediction": 1}
        if ref is not None:
            self.labels["errors"] = error_map(ref, pred)
            vols += [viz.label_volume(c.reference, opacity=self._opacity("reference")),
                     viz.label_volume(data=viz.nifti_bytes(self.labels["errors"], c.prediction),
                                      name=f"{case}_errors.nii.gz", lut=viz.error_lut(), opacity=self._opacity("errors"))]
            self.overlays.update(reference=2, errors=3)
        self.entropy = self.doubtful = None
        if has_maps(c):
            from ..evaluation.uncertainty import most_uncertain_point

            path = PredLayout(c.folder).uncertainty(case)
            self.entropy = read_image(path)[0]
            self.doubtful = most_uncertain_point(self.entropy)
            vols.append(viz.heat_volume(path, opacity=self._opacity("uncertainty")))
            self.overlays["uncertainty"] = len(vols) - 1
        self.nv.load_volumes(vols)
        self.focus = error_focus(ref, pred) if ref is not None else focus_point(pred)
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
        """The lesion table of the case as a list (with the predicted lesion's probability and uncertainty where
        known); choosing a row moves the crosshair to that lesion."""
        rows = lesion_table([found])
        self.spots = [tuple(x["centre_zyx"]) for x in rows]
        was, self._busy = self._busy, True
        self.lesion_list.options = [(lesion_label(x), i) for i, x in enumerate(rows)]
        self.lesion_list.value = None
        self._busy = was

    def jump(self, voxel: tuple[int, int, int] | None) -> None:
        """Move the crosshair (all three planes) to a (z, y, x) voxel and say where it is."""
        if voxel is not None:
            self.nv.scene.crosshair_pos = viz.crosshair_frac(voxel, self.geom)
            z, y, x = (int(v) for v in voxel)
            doubt = f", uncertainty {int(self.entropy[z, y, x])} %" if self.entropy is not None else ""
            self.where.value = f'<span style="margin-left:16px">crosshair at (z, y, x) ({z}, {y}, {x}){doubt}</span>'

    def _opacity(self, overlay: str) -> float:
        """Opacity of an overlay volume: shown in its mode, hidden otherwise."""
        return 0.55 if overlay == self.mode.value else 0.0

    def _apply_mode(self) -> None:
        """Show one overlay (error map, ground truth, prediction or uncertainty); refresh the legend and the 3D view."""
        for name, i in self.overlays.items():
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
        """Surfaces of what the current mode shows, in the palette's colours (errors: the tumours' only;
        uncertainty: the voxels at least DOUBTFUL_PCT % uncertain, in a heat colour, in the predicted liver's)."""
        if self.mode.value == "errors":
            codes = tumour_errors(self.labels["reference"], self.labels["prediction"])
            colours = {k: c for k, (_, c) in plots.ERRORS.items()}
            names = {1: "liver", 2: "agreed tumour", 3: "missed tumour", 4: "invented tumour"}
        elif self.mode.value == "uncertainty":
            doubtful = self.entropy >= DOUBTFUL_PCT
            codes = np.where(doubtful, 2, self.labels["prediction"] > 0).astype(np.uint8)
            colours = {1: plots.OVERLAY[1], 2: tuple(float(v) for v in plots.heat_rgb(75))}
            names = {1: "predicted liver", 2: "uncertain"}
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


def lesion_label(x: dict) -> str:
    """One line of the lesion list: lesion, volume, finding, Dice, and its probability and uncertainty where known."""
    text = f"{x['lesion']}  {x['volume_ml']:.2f} ml  {x['finding']}" + ("" if np.isnan(x["dice"]) else
                                                                       f"  Dice {x['dice']:.3f}")
    if np.isfinite(x.get("probability", np.nan)):
        text += f"  tumour probability {100 * x['probability']:.0f} %, uncertainty {100 * x['uncertainty']:.0f} %"
    return text
