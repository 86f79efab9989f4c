"""05_validate: predict a fold's validation cases, score them, decide post-processing, predict the test set.

Writes the fold folder's `validation/`: `<case>.nii.gz` (resumable case by case),
`summary.json` in nnU-Net v1's layout (the seed's `get_dice_result.py` reads
`results.mean["1"]["Dice"]` unchanged), `per_case.csv`, `timings.json`,
`postprocessing.json`, `qa/<case>.png` and `gallery.png`; `validation_postprocessed/`
holds the post-processed predictions and their summary.
"""
from __future__ import annotations

import csv
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from .device import autocast_dtype
from .infer import InferenceSettings, export, load_model, predict, sliding_window
from .io import atomic_path, read_image, read_json, write_image, write_json
from .layout import CHECKPOINT_KINDS, PredLayout, RawLayout, RunLayout, case_of_file, prediction_name, seg_name
from .metrics import METRICS, case_metrics, largest_component
from .parallel import map_cases
from .store import case_properties, check_preprocessed, open_case
from .viz import error_png, gallery_png


def adopt_run_plans(layout: RunLayout, fold: int) -> None:
    """Give a fold trained before folds held their own plans a copy of the run's, if its checkpoints match them."""
    model = layout.fold(fold)
    if model.plans.is_file() or not layout.pre.plans.is_file():
        return
    plans = read_json(layout.pre.plans)
    hashes = {read_json(model.sidecar(k)).get("plans_hash") for k in CHECKPOINT_KINDS if model.sidecar(k).is_file()}
    if hashes == {plans["preprocessing_hash"]}:
        write_json(model.plans, plans)


def predict_validation(run_dir: str | Path, fold: int, inference: InferenceSettings = InferenceSettings()
                       ) -> dict[str, dict]:
    """Predict every validation case not yet predicted with these settings; per-case timings (s)."""
    layout = RunLayout(run_dir)
    model, pre = layout.fold(fold), layout.pre
    out = model.validation
    check_preprocessed(pre.root)
    adopt_run_plans(layout, fold)
    sidecar = read_json(model.sidecar(inference.checkpoint))
    settings = {**inference.key(), "checkpoint_epoch": sidecar["epoch"],
                "checkpoint_saved": sidecar.get("saved"), "plans_hash": sidecar["plans_hash"]}
    if out.settings.is_file() and read_json(out.settings) != settings:
        for f in out.root.glob("*.nii.gz"):  # made with another checkpoint or settings
            f.unlink()
        out.timings.unlink(missing_ok=True)
    write_json(out.settings, settings)
    timings = read_json(out.timings) if out.timings.is_file() else {}
    net, plans = load_model(model.root, inference.checkpoint, inference.device)
    dev = next(net.parameters()).device
    dtype = autocast_dtype("auto", dev)
    for case in read_json(pre.splits)[fold]["val"]:
        target = out.case(case)
        if target.is_file():
            timings.setdefault(case, {"note": "predicted by an earlier, interrupted run"})
            continue  # resumable: written atomically, so present means complete
        t: dict = {}
        t0 = time.perf_counter()
        image = torch.from_numpy(open_case(pre.case_store(case))["image"][...].astype(np.float32))[None]
        props = case_properties(pre.root, case)
        t["read"] = time.perf_counter() - t0
        s = inference
        probs = sliding_window(net, image, plans["patch_size"], plans["num_classes"], s.step, s.mirror_axes, s.mode,
                               s.level, s.tile_batch, dtype=dtype, timings=t)
        t0 = time.perf_counter()
        export(probs, props, target)
        t["export_write"] = time.perf_counter() - t0
        t["total"] = sum(v for k, v in t.items() if k != "tiles")
        timings[case] = {k: round(v, 4) for k, v in t.items()}
        write_json(out.timings, timings)
    return timings


def _score(job: dict) -> dict:
    """Metrics of one predicted case against its reference."""
    test, _ = read_image(job["test"])
    ref, geom = read_image(job["reference"])
    return {**case_metrics(test, ref.astype(np.uint8), job["labels"], geom.spacing, job["tolerance_mm"]),
            "reference": job["reference"], "test": job["test"]}


def summary_json(per_case: list[dict], labels, name: str, description: str = "") -> dict:
    """nnU-Net v1 summary.json: author, description, id, name, results {all, mean}, task, timestamp."""
    mean = {}
    for lab in map(str, labels):
        keys = per_case[0][lab].keys() if per_case else METRICS
        mean[lab] = {k: float(np.nanmean([c[lab][k] for c in per_case])) if per_case and
                     not all(np.isnan(c[lab][k]) for c in per_case) else float("nan") for k in keys}
    return {"author": "unetpp_lib", "description": description, "id": uuid.uuid4().hex[:12], "name": name,
            "results": {"all": per_case, "mean": mean}, "task": name,
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}


def score_folder(pred_dir: str | Path, raw_dir: str | Path, cases: list[str], labels, name: str,
                 tolerance_mm: float = 2.0, num_workers: int = 1) -> dict:
    """Score predictions against raw labels; write summary.json and per_case.csv into `pred_dir`."""
    pred, raw = PredLayout(pred_dir), RawLayout(raw_dir)
    jobs = [{"case": c, "test": str(pred.case(c)), "reference": str(raw.label(c)),
             "labels": list(labels), "tolerance_mm": tolerance_mm} for c in cases]
    per_case = map_cases(_score, jobs, num_workers, desc="metrics")
    summary = summary_json(per_case, labels, name, f"{len(cases)} cases, surface tolerance {tolerance_mm} mm")
    write_json(pred.summary, summary)
    rows = [{"case": c, **{f"{m} {lab}": r[str(lab)][m] for lab in labels if lab
                           for m in ("Dice", "Hausdorff Distance 95", "Surface Dice")}} for c, r in zip(cases, per_case)]
    with atomic_path(pred.per_case) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        writer.writeheader()
        writer.writerows(rows)
    return summary


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
            vals.append(np.nan if denom == 0 else 2 * (t & r).sum() / denom)
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


def validate_fold(run_dir: str | Path, fold: int, inference: InferenceSettings = InferenceSettings(),
                  tolerance_mm: float = 2.0, num_workers: int = 1) -> dict:
    """Predict, score, decide and apply post-processing for one fold; returns the key results."""
    layout = RunLayout(run_dir)
    timings = predict_validation(layout.root, fold, inference)
    cases = read_json(layout.pre.splits)[fold]["val"]
    raw = layout.raw.root
    ds = read_json(layout.raw.dataset_json)
    labels = sorted(int(k) for k in ds["labels"])
    out = layout.fold(fold).validation
    summary = score_folder(out.root, raw, cases, labels, f"{ds.get('name', 'task')} fold {fold}", tolerance_mm,
                           num_workers)
    decision = decide_postprocessing(out.root, raw, cases, [c for c in labels if c])
    write_json(out.postprocessing, decision)
    post = layout.fold(fold).validation_postprocessed.root
    write_postprocessed(out.root, post, [seg_name(c) for c in cases], decision)
    summary_pp = score_folder(post, raw, cases, labels, f"{ds.get('name', 'task')} fold {fold} post-processed",
                              tolerance_mm, num_workers)
    return {"summary": summary, "summary_postprocessed": summary_pp, "postprocessing": decision, "timings": timings}


def predict_test_set(run_dir: str | Path, fold: int, inference: InferenceSettings = InferenceSettings()
                     ) -> list[dict]:
    """Predict the run's test images with this fold, post-processed as decided on its validation cases."""
    layout = RunLayout(run_dir)
    model = layout.fold(fold)
    out = model.test_predictions.root
    adopt_run_plans(layout, fold)
    records = predict(layout.raw.test_images(), [model.root], out, inference)
    decision_path = model.validation.postprocessing
    if decision_path.is_file():
        write_postprocessed(out, out, [Path(r["prediction"]).name for r in records], read_json(decision_path))
    return records


def qa_gallery(run_dir: str | Path, fold: int, folder: str = "validation") -> list[dict]:
    """A QA picture per validation case through its worst error, and a gallery sorted worst-first by tumour Dice."""
    layout = RunLayout(run_dir)
    out = layout.fold(fold).predictions(folder)
    summary = read_json(out.summary)
    rows = []
    for entry in summary["results"]["all"]:
        case = case_of_file(entry["test"])
        rows.append({"case": case, "tumour_dice": entry.get("2", {}).get("Dice", float("nan")),
                     "liver_dice": entry["1"]["Dice"]})
    # worst first; cases without tumour in reference and prediction (NaN) go last
    rows.sort(key=lambda r: (np.isnan(r["tumour_dice"]), r["tumour_dice"] if not np.isnan(r["tumour_dice"]) else 0))
    for r in rows:
        r["png"] = str(error_png(layout.raw.image(r["case"]), layout.raw.label(r["case"]), out.case(r["case"]),
                                 out.qa(r["case"]),
                                 f"{r['case']}  liver Dice {r['liver_dice']:.3f}  tumour Dice {r['tumour_dice']:.3f}"))
    gallery_png([(r["png"], r["case"]) for r in rows], out.gallery)
    return rows


# ----------------------------------------------------------------------------- cross-validation
CV_METRICS = ("Dice", "Jaccard", "Precision", "Recall", "Hausdorff Distance 95", "Surface Dice")
LABEL_NAMES = {"1": "liver", "2": "tumour"}


def _summary_of(layout: RunLayout, fold: int, folder: str) -> dict:
    """A fold's summary.json, or an error that says which stage to run."""
    path = layout.fold(fold).predictions(folder).summary
    if not path.is_file():
        raise FileNotFoundError(f"cross-validation: fold {fold} has no {path}; run 05_validate for fold {fold} "
                                f"(python run_all.py --stages train validate --folds {fold}) first")
    return read_json(path)


def _mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value) with NaNs left out, and how many values counted."""
    v = np.array([x for x in values if x is not None and not np.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def crossval_summary(run_dir: str | Path, folds: list[int], folder: str = "validation") -> dict:
    """Per-fold mean metrics, mean +- sd over folds and the mean over all validation cases, written to
    `run_dir/crossval_summary.json` and `.csv` (`crossval_summary_postprocessed.*` for the post-processed folder)."""
    layout = RunLayout(run_dir)
    summaries = {k: _summary_of(layout, k, folder) for k in folds}
    labels = [lab for lab in summaries[folds[0]]["results"]["mean"] if lab != "0"]
    per_fold = {str(k): {lab: {m: s["results"]["mean"][lab].get(m, float("nan")) for m in CV_METRICS}
                         for lab in labels} for k, s in summaries.items()}
    over_folds = {lab: {m: _mean_sd([per_fold[str(k)][lab][m] for k in folds]) for m in CV_METRICS} for lab in labels}
    cases = [c for s in summaries.values() for c in s["results"]["all"]]
    all_cases = {lab: {m: _mean_sd([c[lab].get(m, float("nan")) for c in cases])["mean"] for m in CV_METRICS}
                 for lab in labels}
    out = {"folds": list(folds), "folder": folder, "num_cases": len(cases),
           "labels": {lab: LABEL_NAMES.get(lab, lab) for lab in labels}, "per_fold": per_fold,
           "mean_sd_over_folds": over_folds, "mean_over_all_cases": all_cases,
           "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}
    stem = layout.crossval_stem(folder)
    write_json(stem.with_suffix(".json"), out)
    rows = crossval_table(out)
    with atomic_path(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def crossval_table(cv: dict, metrics: tuple[str, ...] = ("Dice", "Hausdorff Distance 95", "Surface Dice")) -> list[dict]:
    """Table rows: one per fold, then mean +- sd over folds and the mean over all validation cases."""
    cols = [(lab, m, f"{name} {m}") for lab, name in cv["labels"].items() for m in metrics]
    rows = [{"fold": k, **{col: round(v[lab][m], 4) for lab, m, col in cols}} for k, v in cv["per_fold"].items()]
    ms = cv["mean_sd_over_folds"]
    rows.append({"fold": "mean +- sd", **{col: f"{ms[lab][m]['mean']:.4f} +- {ms[lab][m]['sd']:.4f}"
                                          for lab, m, col in cols}})
    rows.append({"fold": "all cases", **{col: round(cv["mean_over_all_cases"][lab][m], 4) for lab, m, col in cols}})
    return rows


def predict_test_ensemble(run_dir: str | Path, folds: list[int], inference: InferenceSettings = InferenceSettings()
                          ) -> list[dict]:
    """Predict the test images with the mean probabilities of the folds' models into the run's test ensemble
    folder, post-processed as decided on all the folds' validation cases together; resumable case by case."""
    layout = RunLayout(run_dir)
    out = layout.test_ensemble
    which = inference.checkpoint
    for k in folds:
        adopt_run_plans(layout, k)
        if not layout.fold(k).sidecar(which).is_file():
            raise FileNotFoundError(f"test ensemble: {layout.fold(k).root} has no {which} checkpoint; "
                                    f"train fold {k} first")
    members = [{m: read_json(layout.fold(k).sidecar(which)).get(m) for m in ("epoch", "saved", "plans_hash")}
               for k in folds]
    settings = {**inference.key(), "folds": list(folds), "members": members,
                "save_probabilities": inference.save_probabilities}
    if out.settings.is_file() and read_json(out.settings) != settings:
        for f in [*out.root.glob("*.nii.gz"), *out.root.glob("*.npz"), *out.staging.glob("*"), out.postprocessing]:
            f.unlink(missing_ok=True)  # made by other models or settings
    write_json(out.settings, settings)
    classes = [int(k) for k in read_json(layout.raw.dataset_json)["labels"] if int(k)]
    decision_path = out.postprocessing
    if not decision_path.is_file():
        preds = {c: layout.fold(k).validation.case(c)
                 for k in folds for c in read_json(layout.pre.splits)[k]["val"]}
        missing = [str(p) for p in preds.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"test ensemble: validation predictions missing ({missing[0]} and "
                                    f"{len(missing) - 1} more); run 05_validate for those folds first")
        write_json(decision_path, decide_on_files(preds, layout.raw.root, classes))
    decision = read_json(decision_path)
    images = layout.raw.test_images()
    names = {p: prediction_name(p) for p in images}
    final, staged = out.root, out.staging
    todo = [p for p in images if not (final / names[p]).is_file()]  # the final file is written last, atomically
    unpredicted = [p for p in todo if not (staged / names[p]).is_file()]
    if unpredicted:  # one call: every fold's model is loaded once; each raw prediction is written atomically
        predict(unpredicted, [layout.fold(k).root for k in folds], staged, inference)
    for p in todo:
        seg, geom = read_image(staged / names[p])
        probs = staged / names[p].replace(".nii.gz", ".npz")
        if inference.save_probabilities and probs.is_file():
            probs.replace(final / probs.name)
        write_image(final / names[p], apply_postprocessing(seg, decision), geom)
        (staged / names[p]).unlink()
    return [{"case": case_of_file(names[p]), "prediction": str(final / names[p]), "predicted_now": p in todo}
            for p in images]
