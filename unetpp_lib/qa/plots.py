"""Static QA pictures (PNG, matplotlib without pyplot): planes through a case, error maps, the QA gallery,
spacing and fingerprint plots, training progress, cross-validation and benchmark charts, in one palette.

What the pictures show is computed elsewhere: the error codes and focus voxels in evaluation/errors.py,
the per-case Dice and the worst-first order in evaluation/summary.py.

matplotlib is imported inside each function, so importing the kit stays light.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.io import atomic_path, read_json
from ..core.layout import RunLayout, case_of_image
from ..evaluation.errors import error_focus, error_map, focus_point
from ..evaluation.summary import dice_rows, worst_first

WINDOW_HU = (-160.0, 240.0)  # abdominal window: level 40, width 400
# The one palette (RGB, 0-1) of every PNG and of the NiiVue viewers (viz.py, browser.py): four hues far apart
# (120, 218, 51 and 311 degrees), so they stay apart when blended over the grey CT.
PALETTE = {"liver": (0.2, 0.8, 0.2), "tumour": (0.2, 0.5, 1.0), "missed": (1.0, 0.85, 0.0),
           "invented": (1.0, 0.2, 0.85)}
OVERLAY = {1: PALETTE["liver"], 2: PALETTE["tumour"]}  # a label map: liver green, tumour blue
# error map codes (evaluation.errors.error_map): agreement in the label's colour, disagreement as missed or invented
ERRORS = {1: ("agreed liver", PALETTE["liver"]), 2: ("agreed tumour", PALETTE["tumour"]),
          3: ("missed", PALETTE["missed"]), 4: ("invented", PALETTE["invented"])}


def load_oriented(path: str | Path, is_label: bool = False) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a volume reoriented to LPS, so (z, y, x) = (inferior->superior, anterior->posterior, right->left)."""
    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    arr = sitk.GetArrayFromImage(img)
    return (arr.astype(np.uint8) if is_label else arr.astype(np.float32)), tuple(reversed(img.GetSpacing()))


def _overlay_rgba(lab2d: np.ndarray, alpha: float = 0.45, colours: dict | None = None) -> np.ndarray:
    """RGBA image colouring label values (liver and tumour by default), transparent elsewhere."""
    rgba = np.zeros(lab2d.shape + (4,), np.float32)
    for cls, rgb in (colours or OVERLAY).items():
        rgba[lab2d == cls] = (*rgb, alpha)
    return rgba


def planes_png(image: str | Path, label: str | Path | None, out_png: str | Path,
               title: str = "") -> Path:
    """Save axial, coronal and sagittal planes through the focus point with the label overlay."""
    from matplotlib.figure import Figure  # no pyplot: no global state, works with any backend

    img, sp = load_oriented(image)
    lab = load_oriented(label, is_label=True)[0] if label else None
    z, y, x = focus_point(lab) if lab is not None else tuple(s // 2 for s in img.shape)
    # (2D image slice, label slice, width of a pixel, height of a pixel, name); superior up
    views = [(img[z], lab[z] if lab is not None else None, sp[2], sp[1], f"axial z={z}"),
             (img[::-1, y, :], lab[::-1, y, :] if lab is not None else None, sp[2], sp[0], f"coronal y={y}"),
             (img[::-1, :, x], lab[::-1, :, x] if lab is not None else None, sp[1], sp[0], f"sagittal x={x}")]
    fig = Figure(figsize=(13, 4.8), dpi=100)
    for i, (im2d, lab2d, w, h, name) in enumerate(views):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(im2d, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=h / w,
                  interpolation="nearest")
        if lab2d is not None:
            ax.imshow(_overlay_rgba(lab2d), aspect=h / w, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title or _default_title(image, lab, sp), fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def _default_title(image: str | Path, lab: np.ndarray | None, sp: tuple[float, ...]) -> str:
    """Case name, spacing and structure volumes in millilitres."""
    name = case_of_image(image)
    text = f"{name}  spacing (z,y,x) {tuple(round(s, 3) for s in sp)} mm"
    if lab is not None:
        voxel_ml = float(np.prod(sp)) / 1000.0
        counts = np.bincount(lab.ravel(), minlength=3)
        text += f"  liver {counts[1] * voxel_ml:.1f} ml  tumour {counts[2] * voxel_ml:.1f} ml"
    return text


def spacing_png(table, out_png: str | Path) -> Path:
    """Scatter of slice vs in-plane spacing and histogram of slice counts, from a convert report table."""
    from matplotlib.figure import Figure

    sp = np.array([s for s in table["spacing"] if len(s) == 3], dtype=float).reshape(-1, 3)
    nz = np.array([s[0] for s in table["shape"] if len(s) == 3])
    fig = Figure(figsize=(9, 3.4), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.scatter(sp[:, 1], sp[:, 0], s=18)
    ax1.set_xlabel("in-plane spacing (mm)")
    ax1.set_ylabel("slice spacing (mm)")
    ax1.set_title(f"{len(sp)} cases; median spacing (z,y,x) {np.round(np.median(sp, 0), 3).tolist()} mm", fontsize=9)
    ax2.hist(nz, bins=min(20, max(len(nz), 1)))
    ax2.set_xlabel("slices per case")
    ax2.set_ylabel("cases")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def fingerprint_png(fingerprint: dict, out_png: str | Path) -> Path:
    """Histograms of per-case spacing and size (after cropping) from a fingerprint."""
    from matplotlib.figure import Figure

    cases = list(fingerprint["cases"].values())
    sp = np.array([c["spacing"] for c in cases], dtype=float)
    sh = np.array([c["shape"] for c in cases], dtype=float)
    fig = Figure(figsize=(12, 5.6), dpi=100)
    for row, (data, unit) in enumerate(((sp, "spacing (mm)"), (sh, "size (voxels)"))):
        for axis, name in enumerate("zyx"):
            ax = fig.add_subplot(2, 3, 3 * row + axis + 1)
            ax.hist(data[:, axis], bins=min(20, max(len(cases), 1)))
            ax.axvline(np.median(data[:, axis]), color="red", lw=1)
            ax.set_xlabel(f"{name} {unit}; median {np.median(data[:, axis]):.3g}", fontsize=9)
    fig.suptitle(f"{len(cases)} training cases (red: median)", fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def before_after_png(raw_image: str | Path, raw_label: str | Path, case_store, props: dict,
                     out_png: str | Path) -> Path:
    """A raw slice and its preprocessed counterpart through the focus point, and both intensity histograms."""
    from matplotlib.figure import Figure

    img = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_image))).astype(np.float32)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_label))).astype(np.uint8)
    pre_img, pre_lab = case_store["image"][...].astype(np.float32), case_store["label"][...]
    focus = focus_point(lab)
    # follow the focus voxel through crop, transpose and resampling to its preprocessed slice
    crop_start = [b[0] for b in props["crop_box"]]
    moved = [focus[i] - crop_start[i] for i in props.get("transpose_forward", [0, 1, 2])]
    k = int(min(pre_img.shape[0] - 1, round((moved[0] + 0.5) * pre_img.shape[0] / props["shape_after_crop"][0] - 0.5)))
    fig = Figure(figsize=(15, 4.2), dpi=100)
    panels = [(img[focus[0]], lab[focus[0]], WINDOW_HU, f"raw slice {focus[0]} (HU)"),
              (pre_img[k], pre_lab[k], (-3.0, 3.0), f"preprocessed slice {k} (z-score)")]
    for i, (im2d, lab2d, (lo, hi), title) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        ax.imshow(im2d, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.imshow(_overlay_rgba(lab2d), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    for i, (vals, title) in enumerate(((img[lab > 0], "raw foreground (HU)"),
                                       (pre_img[pre_lab > 0], "preprocessed foreground (z-score)"))):
        ax = fig.add_subplot(1, 4, 3 + i)
        ax.hist(vals[:: max(1, vals.size // 200_000)], bins=80)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{props['case']}: {props['shape_after_crop']} -> {props['shape_after_resampling']} voxels", fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def progress_png(log: list[dict], out_png: str | Path) -> Path:
    """Training curves as the original's progress.png: losses (left), pseudo-Dice (right, green)."""
    from matplotlib.figure import Figure

    ep = [e["epoch"] for e in log]
    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ep, [e["train_loss"] for e in log], color="b", label="train loss")
    ax.plot(ep, [e["val_loss"] for e in log], color="r", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [e["ema_pseudo_dice"] for e in log], color="g", ls="--", label="pseudo-Dice (moving avg)")
    dice = np.array([e["pseudo_dice"] for e in log], dtype=float)
    colours = [OVERLAY[1], OVERLAY[2], "tab:purple", "tab:brown"]  # classes 1, 2 (liver, tumour) in the palette
    for c in range(dice.shape[1] if dice.ndim == 2 else 0):
        ax2.plot(ep, dice[:, c], color=colours[c % len(colours)], ls=":", label=f"pseudo-Dice class {c + 1}")
    ax2.set_ylabel("pseudo-Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def crossval_png(cv: dict, out_png: str | Path, metric: str = "Dice") -> Path:
    """Per-fold bars of a metric for each label, with the mean over folds and its +- sd band."""
    from matplotlib.figure import Figure

    folds = list(cv["per_fold"])
    labels = list(cv["labels"])
    fig = Figure(figsize=(max(5, 1.3 * len(folds) + 2), 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(labels)
    colours = [OVERLAY.get(int(lab), "tab:gray") for lab in labels]  # liver and tumour in the palette's colours
    for i, lab in enumerate(labels):
        x = np.arange(len(folds)) + (i - (len(labels) - 1) / 2) * width
        ax.bar(x, [cv["per_fold"][k][lab][metric] for k in folds], width, color=colours[i],
               label=cv["labels"][lab])
        ms = cv["mean_sd_over_folds"][lab][metric]
        ax.axhline(ms["mean"], color=colours[i], lw=1, ls="--")
        ax.axhspan(ms["mean"] - ms["sd"], ms["mean"] + ms["sd"], color=colours[i], alpha=0.12)
    ax.set_xticks(np.arange(len(folds)), [f"fold {k}" for k in folds])
    ax.set_ylabel(metric)
    if metric in ("Dice", "Jaccard", "Precision", "Recall", "Surface Dice"):
        ax.set_ylim(0, 1)
    ax.set_title(f"cross-validation {metric}: bars per fold, dashed line mean, band +- sd")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


# the uncertainty heat map (entropy, % of ln C) in NiiVue's "redyell" colours, so the PNG and the browser agree:
# dark red (0 %) through orange (50 %) to yellow (100 %); stops as (fraction of 0-100, RGB 0-1). Values below
# HEAT_FLOOR are left transparent: a confident voxel (p 0.999 of 3 classes) still has about 1 %, and colouring
# those would paint the whole organ.
HEAT_COLORMAP = "redyell"
HEAT_FLOOR = 5
HEAT_STOPS = ((0.0, (192 / 255, 1 / 255, 0.0)), (128 / 255, (224 / 255, 128 / 255, 0.0)), (1.0, (1.0, 1.0, 0.0)))


def heat_rgb(percent: np.ndarray | float) -> np.ndarray:
    """HEAT_STOPS' colours (RGB 0-1, shape (..., 3)) of uncertainty values in percent."""
    f = np.clip(np.asarray(percent, np.float32) / 100.0, 0.0, 1.0)
    at = [t for t, _ in HEAT_STOPS]
    return np.stack([np.interp(f, at, [c[i] for _, c in HEAT_STOPS]) for i in range(3)], axis=-1)


def _heat_rgba(percent2d: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """RGBA image of an uncertainty slice in the heat colours, transparent below HEAT_FLOOR (and at 0)."""
    rgba = np.zeros(percent2d.shape + (4,), np.float32)
    rgba[..., :3] = heat_rgb(percent2d)
    rgba[..., 3] = np.where((percent2d >= HEAT_FLOOR) & (percent2d > 0), alpha, 0.0)
    return rgba


def _entropy_beside(prediction: str | Path) -> Path | None:
    """The entropy map saved beside a prediction (PredLayout.uncertainty), None when there is none."""
    from ..core.layout import PredLayout, case_of_file

    path = PredLayout(Path(prediction).parent).uncertainty(case_of_file(prediction))
    return path if path.is_file() else None


def error_png(image: str | Path, reference: str | Path | None, prediction: str | Path, out_png: str | Path,
              title: str = "", entropy: str | Path | None = None) -> Path:
    """Three planes through the largest error with the error map filled in the palette and its legend;
    without a reference, through the largest predicted tumour with the prediction's liver and tumour.

    Where the prediction has an entropy map (`entropy`, by default the one saved beside it), a second row shows
    it as a heat map over the CT on the same three planes, so where the model doubted sits under what it got wrong.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    img, sp = load_oriented(image)
    pred = load_oriented(prediction, is_label=True)[0]
    if reference is not None:
        ref = load_oriented(reference, is_label=True)[0]
        codes, colours, focus = error_map(ref, pred), {k: c for k, (_, c) in ERRORS.items()}, error_focus(ref, pred)
        legend = [(name, c) for name, c in ERRORS.values()]
    else:
        codes, colours, focus = pred, OVERLAY, focus_point(pred)
        legend = [("predicted liver", OVERLAY[1]), ("predicted tumour", OVERLAY[2])]
    entropy = entropy or _entropy_beside(prediction)
    heat = load_oriented(entropy, is_label=True)[0] if entropy else None
    z, y, x = focus
    views = [(lambda a: a[z], sp[2], sp[1], f"axial z={z}"), (lambda a: a[::-1, y, :], sp[2], sp[0], f"coronal y={y}"),
             (lambda a: a[::-1, :, x], sp[1], sp[0], f"sagittal x={x}")]
    rows = 1 if heat is None else 2
    fig = Figure(figsize=(13, 4.8 if heat is None else 8.8), dpi=100)
    for i, (cut, w, h, name) in enumerate(views):
        ax = fig.add_subplot(rows, 3, i + 1)
        ax.imshow(cut(img), cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=h / w, interpolation="nearest")
        ax.imshow(_overlay_rgba(cut(codes), 0.55, colours), aspect=h / w, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        if heat is not None:
            ax = fig.add_subplot(rows, 3, i + 4)
            ax.imshow(cut(img), cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=h / w,
                      interpolation="nearest")
            ax.imshow(_heat_rgba(cut(heat)), aspect=h / w, interpolation="nearest")
            ax.set_title(f"uncertainty, {name} (max {int(cut(heat).max())} %)", fontsize=9)
            ax.set_axis_off()
    if heat is not None:
        legend += [(f"uncertainty {v} %", tuple(heat_rgb(v))) for v in (HEAT_FLOOR, 50, 100)]
    fig.legend(handles=[Patch(color=c, label=n) for n, c in legend], loc="lower center", ncol=len(legend),
               fontsize=9, frameon=False)
    fig.suptitle(title or Path(prediction).name, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if heat is None else 0.035, 1, 1))
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def gallery_png(items: list[tuple[str | Path, str]], out_png: str | Path, columns: int = 2) -> Path:
    """Tile QA pictures (path, caption) into one image, in the given order (worst first)."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    rows = max(1, -(-len(items) // columns))
    fig = Figure(figsize=(6.5 * columns, 2.6 * rows), dpi=100)
    for i, (path, caption) in enumerate(items):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(imread(str(path)))
        ax.set_title(caption, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def benchmark_png(bench: dict, out_png: str | Path) -> Path:
    """Training samples/s per configuration, inference time per stage, and ours beside the seed's FPS."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), dpi=100)
    ax = fig.add_subplot(1, 3, 1)
    tr = bench["training"]
    names = [f"bs{r['batch_size']} {r['precision'].replace('torch.', '')}{' CL' if r['channels_last'] else ''}"
             f"{' compiled' if r['compile'] else ''}" for r in tr]
    ax.barh(names, [r["samples_per_s"] for r in tr], color="tab:blue")
    ax.set_xlabel("training samples/s")
    ax.set_title(f"training step, {bench['device']}", fontsize=9)
    ax = fig.add_subplot(1, 3, 2)
    inf = bench["inference"]
    labels = [f"{r['mode']}{r['level'] or ''} x{r['mirrorings']}" for r in inf]
    left = np.zeros(len(inf))
    for stage, colour in (("network", "tab:orange"), ("sliding_window", "tab:gray"), ("export_write", "tab:green")):
        vals = np.array([r.get(stage, 0.0) for r in inf])
        ax.barh(labels, vals, left=left, color=colour, label=stage)
        left += vals
    ax.set_xlabel("seconds per case")
    ax.set_title(f"inference, case {inf[0]['shape'] if inf else ''}", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 3, 3)
    seed = bench["seed"]["table"]
    best = max(tr, key=lambda r: r["samples_per_s"]) if tr else None
    rows = [(r["run"], r["samples_per_s"]) for r in seed] + ([(f"ours: {bench['device']} x1", best["samples_per_s"])] if best else [])
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color=["tab:gray"] * len(seed) + ["tab:red"])
    ax.set_xlabel("samples/s (seed: its own plan and cards)")
    ax.set_title("the seed's published FPS and ours", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def qa_pictures(rows: list[dict], gallery: str | Path) -> list[dict]:
    """An error-map PNG per row (keys image, reference or None, prediction, png, caption) and their gallery."""
    for r in rows:
        error_png(r["image"], r["reference"], r["prediction"], r["png"], r["caption"])
    gallery_png([(r["png"], r["case"]) for r in rows], gallery)
    return rows


def qa_gallery(run_dir: str | Path, fold: int, folder: str = "validation") -> list[dict]:
    """An error-map picture per validation case through its worst error, and a gallery sorted worst-first."""
    layout = RunLayout(run_dir)
    out = layout.fold(fold).predictions(folder)
    rows = worst_first(dice_rows(read_json(out.summary)))
    for r in rows:
        r.update(image=layout.raw.image(r["case"]), reference=layout.raw.label(r["case"]),
                 prediction=out.case(r["case"]), png=str(out.qa(r["case"])),
                 caption=f"{r['case']}  liver Dice {r['liver_dice']:.3f}  tumour Dice {r['tumour_dice']:.3f}")
    return qa_pictures(rows, out.gallery)


def _panel_says(ax, text: str) -> None:
    """Say in the panel why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _all_finite(*values) -> bool:
    """Whether every value is a finite number."""
    return all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)


def uncertainty_png(section: dict, out_png: str | Path) -> Path:
    """Three panels from summary.json's `uncertainty` section: error-detection curves against the boundary baseline
    and random flagging, case score vs Dice, and lesion precision and recall by confidence threshold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), dpi=100)
    det = section.get("error_detection") or {}
    curves = det.get("curve") or {}
    ax = fig.add_subplot(1, 3, 1)
    if curves.get("uncertainty") and _all_finite(det["uncertainty"]["auc"]):
        grid = np.array([p[0] for p in curves["uncertainty"]])
        shown = grid > 0  # log x: 0.1 % to 100 % flagged
        for name, colour, pts in (("uncertainty", "tab:red", curves["uncertainty"]),
                                  ("boundary", "tab:gray", curves.get("boundary") or []),
                                  ("random", "k", [[x, x] for x in grid])):
            f = det[name]
            if not pts or not _all_finite(f["auc"]):
                continue
            xy = np.array(pts, dtype=float)
            xy = xy[xy[:, 0] > 0] if name != "random" else xy[shown]
            label = (f"{name}: {100 * f['at_1pct']:.0f} / {100 * f['at_5pct']:.0f} / {100 * f['at_10pct']:.0f} %"
                     f" at 1 / 5 / 10 %, AUC {f['auc']:.3f}")
            ax.plot(100 * xy[:, 0], 100 * xy[:, 1], color=colour, ls=":" if name == "random" else "-", label=label)
            ax.plot([1, 5, 10], [100 * f["at_1pct"], 100 * f["at_5pct"], 100 * f["at_10pct"]], "o", color=colour,
                    ms=4)
        ax.set_xscale("log")
        ax.set_xlim(0.1, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("body voxels flagged (%)")
        ax.set_ylabel("wrong voxels caught (%)")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"error detection: {det.get('wrong_voxels', 0)} wrong of {det.get('body_voxels', 0)} body voxels",
                     fontsize=9)
    else:
        _panel_says(ax, "error detection: no wrong voxels\n(no labelled case with uncertainty maps)")
    ax = fig.add_subplot(1, 3, 2)
    rows = [r for r in section.get("per_case") or [] if _all_finite(r.get("score"), r.get("dice"))]
    rank = section.get("ranking") or {}
    if rows:
        ax.scatter([r["dice"] for r in rows], [r["score"] for r in rows], s=18, color="tab:red")
        ax.set_xlabel("case Dice (mean over foreground labels)")
        ax.set_ylabel("case score (uncertain voxels per predicted voxel)")
        rs, rv = rank.get("score_vs_dice", float("nan")), rank.get("volume_vs_dice", float("nan"))
        ax.set_title(f"{len(rows)} cases; Spearman rho vs Dice (useful: < 0)\nscore {rs:.2f}, "
                     f"predicted volume {rv:.2f} (baseline)", fontsize=9)
    else:
        _panel_says(ax, "case score vs Dice: no case with both")
    ax = fig.add_subplot(1, 3, 3)
    les = section.get("lesion_thresholds") or {}
    conf, vol = les.get("confidence") or [], les.get("volume") or []
    if conf and any(_all_finite(r["precision"]) for r in conf):
        t = [r["threshold"] for r in conf]
        auc = les.get("pr_auc") or {}
        for name, colour, rs in (("confidence", "tab:red", conf), ("volume", "tab:gray", vol)):
            ax.plot(t[:len(rs)], [r["precision"] for r in rs], "o-", color=colour, ms=4,
                    label=f"{name} precision (PR-AUC {auc.get(name, float('nan')):.3f})")
            ax.plot(t[:len(rs)], [r["recall"] for r in rs], "--", color=colour, label=f"{name} recall")
        for x, r in zip(t, conf):
            ax.annotate(str(r["kept"]), (x, r["precision"]), fontsize=7, textcoords="offset points", xytext=(0, 5))
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("lesion probability threshold")
        ax.set_ylabel("precision, recall")
        ax.set_title("lesions kept (numbers) by probability\nbaseline: as many kept, largest first", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    elif conf and all(_all_finite(r["kept"]) for r in conf):  # probabilities known, none as high as a threshold
        _panel_says(ax, f"lesion thresholds: no predicted lesion with a tumour\nprobability of "
                        f"{conf[0]['threshold']:g} or more (of {len(conf)} thresholds)")
    else:
        _panel_says(ax, "lesion thresholds: no predicted lesion with a probability")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)
