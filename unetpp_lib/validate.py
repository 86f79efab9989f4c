"""05_validate: predict a fold's validation cases, score them, decide post-processing, predict the test set.

Writes the fold folder's `validation/`: `<case>.nii.gz` (resumable case by case),
`summary.json` in nnU-Net v1's layout (the seed's `get_dice_result.py` reads
`results.mean["1"]["Dice"]` unchanged), `per_case.csv`, `timings.json` and
`postprocessing.json`; summary.json's added `lesions` section holds the lesion-wise findings
(lesions.py); `validation_postprocessed/` holds the post-processed predictions
and their summary. The QA pictures are `plots.qa_gallery`; across folds, `crossval.py`.
"""
from __future__ import annotations

import csv
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from .nn.checkpoint import adopt_run_plans
from .nn.infer import InferenceSettings, announce, export, inference_choice, load_model, predict, sliding_window
from .core.currency import renew
from .core.io import atomic_path, discard, disk_space, read_image, read_json, write_json
from .core.layout import UNCERTAINTY_KINDS, PredLayout, RawLayout, RunLayout, seg_name
from .evaluation import uncertainty as uq
from .evaluation.lesions import case_lesions, section
from .evaluation.metrics import INVENTED_ML, INVENTED_PCT, METRICS, case_metrics
from .core.pool import map_cases, progress
# apply_postprocessing is re-exported: the parity suite imports it from here
from .evaluation.postprocess import apply_postprocessing, decide_postprocessing, write_postprocessed  # noqa: F401
from .prep.store import case_properties, check_preprocessed, open_case

CASE_COLUMNS = ("Dice", "Hausdorff Distance 95", "Surface Dice", INVENTED_ML, INVENTED_PCT)  # per_case.csv
UNCERTAINTY_COLUMN = "Uncertainty Score"  # per_case.csv, where the folder has uncertainty maps (uq.case_score)


def share_maps(src: PredLayout, dst: PredLayout, cases: list[str]) -> None:
    """The uncertainty maps of `cases` in `src` also in `dst` (hard links where possible): post-processing removes
    components, not probabilities, so a post-processed prediction has the maps of the one it came from."""
    for case in cases:
        for kind in UNCERTAINTY_KINDS:
            a, b = src.uncertainty(case, kind), dst.uncertainty(case, kind)
            if not a.is_file() or a.resolve() == b.resolve():
                continue
            with atomic_path(b) as tmp:
                try:
                    os.link(a, tmp)
                except OSError:  # another file system, or no hard links there
                    shutil.copyfile(a, tmp)


def predict_validation(run_dir: str | Path, fold: int, inference: InferenceSettings = InferenceSettings()
                       ) -> dict[str, dict]:
    """Predict every validation case not yet predicted with these settings; per-case timings (s)."""
    layout = RunLayout(run_dir)
    model, pre = layout.fold(fold), layout.pre
    out = model.validation
    check_preprocessed(pre.root)
    adopt_run_plans(layout, fold)
    sidecar = read_json(model.sidecar(inference.checkpoint))
    store_hash = read_json(pre.plans)["preprocessing_hash"]
    if sidecar["plans_hash"] != store_hash:  # e.g. a fold imported from v1 into a run preprocessed for other plans
        raise ValueError(f"{model.sidecar(inference.checkpoint)}: this fold's model was made for plans "
                         f"{sidecar['plans_hash']}, but {pre.plans} (the store its validation cases are read from) is "
                         f"{store_hash}; preprocess the run with the fold's plans.json (copy it to {pre.plans} and "
                         f"run 03_preprocess) or validate the fold in the run it was trained in")
    settings = {**inference.key(), "model_epoch": sidecar["epoch"],
                "model_saved": sidecar.get("saved"), "plans_hash": sidecar["plans_hash"]}
    renew(out.settings, settings, lambda: discard([*out.root.glob("*.nii.gz"), *out.root.glob("uncertainty/*.nii.gz"),
                                                   out.timings]))
    timings = read_json(out.timings) if out.timings.is_file() else {}
    net, plans = load_model(model.root, inference.checkpoint, inference.device)
    choice = inference_choice(net, plans, inference)
    announce(choice)
    for case in progress(read_json(pre.splits)[fold]["val"], f"predict fold {fold} validation"):
        target = out.case(case)
        if target.is_file() and (not inference.save_uncertainty or uq.has_maps(out.root, case)):
            timings.setdefault(case, {"note": "predicted by an earlier, interrupted run"})
            continue  # resumable: written atomically and last, so present means complete
        t: dict = {}
        t0 = time.perf_counter()
        image = torch.from_numpy(open_case(pre.case_store(case))["image"][...].astype(np.float32))[None]
        props = case_properties(pre.root, case)
        t["read"] = time.perf_counter() - t0
        s = inference
        probs = sliding_window(net, image, plans["patch_size"], plans["num_classes"], s.step_size, s.mirror_axes,
                               s.head_mode, s.pruned_level, s.tile_batch, dtype=choice.dtype, timings=t,
                               compile=s.compile, channels_last=choice.channels_last, desc=f"{case} tiles",
                               uncertainty=s.save_uncertainty)
        t0 = time.perf_counter()
        export(probs, props, target, maps_to=out if s.save_uncertainty else None)
        t["export_write"] = time.perf_counter() - t0
        t["total"] = sum(v for k, v in t.items() if k != "tiles")
        timings[case] = {k: round(v, 4) for k, v in t.items()}
        write_json(out.timings, timings)
    return timings


def _score(job: dict) -> dict:
    """Metrics of one predicted case against its reference."""
    test, _ = read_image(job["test"])
    ref, geom = read_image(job["reference"])
    ref = ref.astype(np.uint8)
    out = {**case_metrics(test, ref, job["labels"], geom.spacing, job["tolerance_mm"]),
           "reference": job["reference"], "test": job["test"]}
    if job["lesions"]:  # read once here; score_folder moves it into summary.json's `lesions` section
        out["_lesions"] = case_lesions(test, ref, geom.spacing)
    maps = uq.read_maps(job["folder"], job["case"]) if job["image"] else None
    if maps is not None:  # and this into its `uncertainty` section
        out["_uncertainty"] = uq.case_uncertainty(test, ref, read_image(job["image"])[0], maps, geom.spacing)
    return out


def summary_json(per_case: list[dict], labels, name: str, description: str = "") -> dict:
    """nnU-Net v1 summary.json: author, description, id, name, results {all, mean}, task, timestamp."""
    mean = {}
    for lab in map(str, labels):  # NaN (label absent from test and reference) left out of the mean, as v1's
        keys = per_case[0][lab].keys() if per_case else METRICS
        mean[lab] = {k: float(np.nanmean([c[lab][k] for c in per_case])) if per_case and
                     not all(np.isnan(c[lab][k]) for c in per_case) else float("nan") for k in keys}
    return {"author": "unetpp_lib", "description": description, "id": uuid.uuid4().hex[:12], "name": name,
            "results": {"all": per_case, "mean": mean}, "task": name,
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}


def score_folder(pred_dir: str | Path, raw_dir: str | Path, cases: list[str], labels, name: str,
                 tolerance_mm: float = 2.0, num_workers: int = 1, lesions: bool = False,
                 images: list[str | Path] | None = None) -> dict:
    """Score predictions against raw labels; write summary.json and per_case.csv into `pred_dir`.

    With `lesions`, summary.json gets a `lesions` section (lesions.py) beside v1's keys, which stay as they are;
    without it the summary is exactly v1's layout (what the parity suite compares key for key). Where the folder
    has a case's uncertainty maps (and `lesions`), it also gets an `uncertainty` section (evaluation/uncertainty.py:
    case scores, error detection, lesion confidence; each predicted lesion gains its probability and uncertainty)
    and per_case.csv an `Uncertainty Score` column. `images`: the CT of each case (the error detection counts the
    voxels inside the body); default the raw folder's training images.
    """
    pred, raw = PredLayout(pred_dir), RawLayout(raw_dir)
    images = [str(p) for p in images] if images is not None else [str(raw.image(c)) for c in cases]
    jobs = [{"case": c, "test": str(pred.case(c)), "reference": str(raw.label(c)), "folder": str(pred.root),
             "image": im if lesions and uq.has_maps(pred.root, c) else None,
             "labels": list(labels), "tolerance_mm": tolerance_mm, "lesions": lesions} for c, im in zip(cases, images)]
    per_case = map_cases(_score, jobs, num_workers, desc="metrics")
    found = [c.pop("_lesions", None) for c in per_case]
    doubt = [c.pop("_uncertainty", None) for c in per_case]
    summary = summary_json(per_case, labels, name, f"{len(cases)} cases, surface tolerance {tolerance_mm} mm")
    if lesions:
        summary["lesions"] = section(cases, found)
    if lesions and any(d is not None for d in doubt):
        summary["uncertainty"] = uncertainty_section(cases, per_case, found, doubt, labels)
    write_json(pred.summary, summary)
    rows = [{"case": c, **{f"{m} {lab}": r[str(lab)][m] for lab in labels if lab
                           for m in CASE_COLUMNS}} for c, r in zip(cases, per_case)]
    if "uncertainty" in summary:
        for row, d in zip(rows, doubt):
            row[UNCERTAINTY_COLUMN] = d["score"] if d else float("nan")
    with atomic_path(pred.per_case) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        writer.writeheader()
        writer.writerows(rows)
    return summary


def uncertainty_section(cases: list[str], per_case: list[dict], found: list[dict], doubt: list[dict | None],
                        labels) -> dict:
    """summary.json's `uncertainty` section of the cases with maps; each of their predicted lesions (in `found`, the
    lesions section's per-case entries) gains its mean tumour probability and uncertainty."""
    keep = [i for i, d in enumerate(doubt) if d is not None]
    for i in keep:
        for lesion, conf in zip(found[i]["predicted"], doubt[i]["lesions"]):
            lesion.update(probability=conf["probability"], uncertainty=conf["uncertainty"])
    dice = [float(np.nanmean(v)) if not all(np.isnan(v)) else float("nan")
            for v in ([per_case[i][str(lab)]["Dice"] for lab in labels if lab] for i in keep)]
    return uq.section([cases[i] for i in keep], [doubt[i] for i in keep], dice,
                      [{"case": cases[i], **found[i]} for i in keep])


def validate_fold(run_dir: str | Path, fold: int, inference: InferenceSettings = InferenceSettings(),
                  tolerance_mm: float = 2.0, num_workers: int = 1) -> dict:
    """Predict, score, decide and apply post-processing for one fold; returns the key results."""
    layout = RunLayout(run_dir)
    cases = read_json(layout.pre.splits)[fold]["val"]
    with disk_space(layout.fold(fold).root, prediction_bytes(layout, cases, inference), "05_validate"):
        return _validate_fold(layout, fold, cases, inference, tolerance_mm, num_workers)


def prediction_bytes(layout: RunLayout, cases: list[str], inference: InferenceSettings) -> float:
    """About what a fold's predictions of `cases` take on disk: as the raw labels, twice (post-processed too); with
    probabilities, float16 per class of every voxel (~2 B per voxel per class, compressed about 2x)."""
    labels = sum(layout.raw.label(c).stat().st_size for c in cases if layout.raw.label(c).is_file())
    return 2 * labels * (1 + 20 * inference.save_probabilities)


def _validate_fold(layout: RunLayout, fold: int, cases: list[str], inference: InferenceSettings,
                   tolerance_mm: float, num_workers: int) -> dict:
    """validate_fold's work, inside its check for a full disk."""
    timings = predict_validation(layout.root, fold, inference)
    raw = layout.raw.root
    ds = read_json(layout.raw.dataset_json)
    labels = sorted(int(k) for k in ds["labels"])
    out = layout.fold(fold).validation
    summary = score_folder(out.root, raw, cases, labels, f"{ds.get('name', 'task')} fold {fold}", tolerance_mm,
                           num_workers, lesions=True)
    decision = decide_postprocessing(out.root, raw, cases, [c for c in labels if c])
    write_json(out.postprocessing, decision)
    post = layout.fold(fold).validation_postprocessed.root
    write_postprocessed(out.root, post, [seg_name(c) for c in cases], decision)
    share_maps(out, PredLayout(post), cases)
    summary_pp = score_folder(post, raw, cases, labels, f"{ds.get('name', 'task')} fold {fold} post-processed",
                              tolerance_mm, num_workers, lesions=True)
    return {"summary": summary, "summary_postprocessed": summary_pp, "postprocessing": decision, "timings": timings}


def predict_test_set(run_dir: str | Path, fold: int, inference: InferenceSettings = InferenceSettings()
                     ) -> list[dict]:
    """Predict the run's test images with this fold, post-processed as decided on its validation cases."""
    layout = RunLayout(run_dir)
    model = layout.fold(fold)
    out = model.test_predictions.root
    adopt_run_plans(layout, fold)
    need = sum(p.stat().st_size for p in layout.raw.test_images()) / 4  # a uint8 mask of each int16 image, or less
    with disk_space(out, need, "05_validate (test set)"):
        records = predict(layout.raw.test_images(), [model.root], out, inference)
        decision_path = model.validation.postprocessing
        if decision_path.is_file():
            write_postprocessed(out, out, [Path(r["prediction"]).name for r in records], read_json(decision_path))
    return records


def validate_holdout(run_dir: str | Path, fold: int, inference: InferenceSettings = InferenceSettings(),
                     tolerance_mm: float = 2.0, num_workers: int = 1) -> dict | None:
    """Predict and score the run's held-out scans (`run_dir/msd_holdout`, longer than the training scans) with this
    fold into `fold_<k>/holdout/`, and with the post-processing decided on its validation (as its test predictions)
    into `holdout_postprocessed/`; {"summary", "summary_postprocessed" (None without a decision)}, or None when the
    run has no held-out scans."""
    layout = RunLayout(run_dir)
    task = layout.msd_holdout
    if not (task / "dataset.json").is_file():
        return None
    ds = read_json(task / "dataset.json")
    cases = [Path(e["label"]).name[:-len(".nii.gz")] for e in ds["training"]]
    fold_dir = layout.fold(fold)
    out, post = fold_dir.holdout, fold_dir.holdout_postprocessed
    sidecar = read_json(fold_dir.sidecar(inference.checkpoint))
    renew(out.settings, {**inference.key(), "model_epoch": sidecar["epoch"], "model_saved": sidecar.get("saved"),
                         "cases": cases}, lambda: discard([*out.root.glob("*.nii.gz"),
                                                           *out.root.glob("uncertainty/*.nii.gz")]))
    images = [task / "imagesTr" / f"{c}.nii.gz" for c in cases]
    todo = [im for c, im in zip(cases, images)
            if not out.case(c).is_file() or (inference.save_uncertainty and not uq.has_maps(out.root, c))]
    labels = sorted(int(k) for k in ds["labels"])
    with disk_space(out.root, sum(p.stat().st_size for p in todo) / 2, "05_validate (held-out scans)"):
        if todo:
            predict(todo, [fold_dir.root], out.root, inference)
        summary = score_folder(out.root, task, cases, labels, f"held-out scans, fold {fold}", tolerance_mm,
                               num_workers, lesions=True, images=images)
        summary_pp = None
        if fold_dir.validation.postprocessing.is_file():
            write_postprocessed(out.root, post.root, [seg_name(c) for c in cases],
                                read_json(fold_dir.validation.postprocessing))
            share_maps(out, post, cases)
            summary_pp = score_folder(post.root, task, cases, labels, f"held-out scans, fold {fold}, post-processed",
                                      tolerance_mm, num_workers, lesions=True, images=images)
    return {"summary": summary, "summary_postprocessed": summary_pp}
