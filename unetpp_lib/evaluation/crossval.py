"""05_validate across folds: the cross-validation summary (per fold, mean +- sd, all cases) and the fold
ensemble's test predictions (mean probabilities of the folds' models, post-processed as decided on all
their validation cases together).
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from ..nn.checkpoint import adopt_run_plans
from ..nn.infer import InferenceSettings, predict
from ..core.currency import renew
from ..core.io import atomic_path, discard, read_image, read_json, write_image, write_json
from ..core.labels import shown_name
from ..core.layout import UNCERTAINTY_KINDS, PredLayout, RunLayout, case_of_file, prediction_name, probabilities_path
from . import uncertainty as uq
from .lesions import overall as lesions_overall
from .postprocess import apply_postprocessing, decide_on_files

CV_METRICS = ("Dice", "Jaccard", "Precision", "Recall", "Hausdorff Distance 95", "Surface Dice", "Invented Volume %")


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
    """Per-fold mean metrics, mean +- sd over folds, the mean over all validation cases and the lesion detection
    per fold and pooled (`lesions`, from the folds' summary.json), written to
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
           "labels": {lab: shown_name(lab) for lab in labels}, "per_fold": per_fold,
           "mean_sd_over_folds": over_folds, "mean_over_all_cases": all_cases,
           "lesions": _lesions_over_folds(summaries), "uncertainty": _uncertainty_over_folds(summaries),
           "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}
    stem = layout.crossval_stem(folder)
    write_json(stem.with_suffix(".json"), out)
    rows = crossval_table(out)
    with atomic_path(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _lesions_over_folds(summaries: dict[int, dict]) -> dict | None:
    """Lesion detection per fold and over all the folds' cases pooled; None when a fold's summary has none."""
    if not all("lesions" in s for s in summaries.values()):
        return None  # summaries written before lesion findings existed: rerun 05_validate to add them
    per_fold = {str(k): s["lesions"]["overall"] for k, s in summaries.items()}
    pooled = [c for s in summaries.values() for c in s["lesions"]["per_case"]]
    first = next(iter(summaries.values()))["lesions"]
    return {"connectivity": first["connectivity"], "bins": first["bins"], "rule": first["rule"],
            "per_fold": per_fold, "all_cases": lesions_overall(pooled)}


def _uncertainty_over_folds(summaries: dict[int, dict]) -> dict | None:
    """Error detection, case ranking and lesion confidence per fold and over all the folds' cases pooled (their
    histograms summed); None when a fold's summary has no uncertainty section (maps not saved)."""
    secs = {k: s.get("uncertainty") for k, s in summaries.items()}
    if not all(secs.values()) or not all("lesions" in s for s in summaries.values()):
        return None
    per_fold = {str(k): {"error_detection": {m: sec["error_detection"][m] for m in ("uncertainty", "boundary",
                                                                                      "beats_baseline")},
                         "ranking": sec["ranking"]} for k, sec in secs.items()}
    rows = [r for sec in secs.values() for r in sec["per_case"]]
    hists = [sec["error_detection"]["histograms"] for sec in secs.values() if "histograms" in sec["error_detection"]]
    lesion_cases = [c for s in summaries.values() for c in s["lesions"]["per_case"]]
    return {"per_fold": per_fold, "all_cases": uq.pooled_section(rows, hists, lesion_cases)}


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
    renew(out.settings, settings, lambda: discard(  # made by other models or settings
        [*out.root.glob("*.nii.gz"), *out.root.glob("*.npz"), *out.root.glob("uncertainty/*.nii.gz"),
         *out.staging.glob("*.*"), *out.staging.glob("uncertainty/*.nii.gz"), out.postprocessing]))
    classes = [int(k) for k in read_json(layout.raw.dataset_json)["labels"] if int(k)]
    decision_path = out.postprocessing
    if not decision_path.is_file():
        splits = read_json(layout.pre.splits)
        preds = {c: layout.fold(k).validation.case(c) for k in folds for c in splits[k]["val"]}
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
    unpredicted = [p for p in todo if not (staged / names[p]).is_file()]  # its maps are written before it
    if unpredicted:  # one call: every fold's model is loaded once; each raw prediction is written atomically
        predict(unpredicted, [layout.fold(k).root for k in folds], staged, inference)
    for p in todo:
        seg, geom = read_image(staged / names[p])
        probs = probabilities_path(staged / names[p])
        if inference.save_probabilities and probs.is_file():
            probs.replace(final / probs.name)
        for kind in UNCERTAINTY_KINDS:
            m = PredLayout(staged).uncertainty(case_of_file(names[p]), kind)
            if m.is_file():
                final_map = out.uncertainty(case_of_file(names[p]), kind)
                final_map.parent.mkdir(parents=True, exist_ok=True)
                m.replace(final_map)
        write_image(final / names[p], apply_postprocessing(seg, decision), geom)
        (staged / names[p]).unlink()
    return [{"case": case_of_file(names[p]), "prediction": str(final / names[p]), "predicted_now": p in todo}
            for p in images]
