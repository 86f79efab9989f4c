"""The GPU check beside the original: nnU-Net v1.6.4's trainer and predict_3D, timed in the same run as the kit.

The original runs in a child process with its own interpreter and packages (`original_python`, and
`original_path` in front of its PYTHONPATH: v1's pins, numpy < 2 and batchgenerators 0.21, are not the
kit's), from unetpp_lib/perf/v1/v1_side.py, which this module never imports. Both sides get the same
inputs: the training cases are the data pipeline's synthetic Task03-sized cases (pipeline.synthetic_arrays),
written in v1's unpacked layout; inference is one random case of `inference_shape`, step 0.5, every
mirroring, Gaussian weighting, fp16. `comparison` puts the two sides' figures and their ratios together.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .child import child_result
from .pipeline import cases_before, synthetic_arrays
from ..core.device import resolve_device
from ..prep.store import sample_locations

V1_DIR = Path(__file__).resolve().parent / "v1"
SIDE = V1_DIR / "v1_side.py"
DATA_ID = "nnUNetData_plans_v2.1"  # v1's 3d_fullres data identifier (ExperimentPlanner3D_v21)
TRAIN_TARGET, INFER_TARGET = 2.0, 0.5  # issue 26: the kit trains >= 2x the original's samples/s, infers in <= 0.5x
MOONSHOT = {"samples_per_s": 20.0, "case_s": 60.0}
# What a machine with torch, numpy, scipy, scikit-image, scikit-learn, pandas and matplotlib but no registry
# needs for v1's trainer and predict_3D: pure-Python wheels (1.2 MB), built with `pip wheel --no-deps`
# (docs/gpu.md). SimpleITK (a 53 MB wheel) may stay behind: v1_side puts a stand-in that raises on use in its place.
V1_WHEELS = ["nnunet==1.6.4", "batchgenerators==0.21", "medpy==0.5.2", "future==1.0.0"]


def v1_plans(plans: dict) -> dict:
    """v1's plans file (plans_v2.1, one 3d_fullres stage) for the kit's plan, as JSON (v1_side pickles it)."""
    norm = plans["normalization"]
    stage = {"batch_size": plans["batch_size"], "num_pool_per_axis": plans["num_pool_per_axis"],
             "patch_size": plans["patch_size"], "median_patient_size_in_voxels": plans["median_shape"],
             "current_spacing": plans["target_spacing"], "original_spacing": plans["target_spacing"],
             "do_dummy_2D_data_aug": plans["do_dummy_2D_data_aug"],
             "pool_op_kernel_sizes": plans["pool_op_kernel_sizes"], "conv_kernel_sizes": plans["conv_kernel_sizes"]}
    classes = list(range(1, plans["num_classes"]))
    return {"plans_per_stage": {"0": stage}, "num_stages": 1, "num_modalities": plans["num_input_channels"],
            "num_classes": plans["num_classes"] - 1, "all_classes": classes, "base_num_features": plans["base_num_features"],
            "conv_per_stage": plans["conv_per_stage"], "transpose_forward": plans["transpose_forward"],
            "transpose_backward": [int(i) for i in np.argsort(plans["transpose_forward"])],
            "keep_only_largest_region": None, "min_region_size_per_class": None, "min_size_per_class": None,
            "data_identifier": DATA_ID, "preprocessor_name": "GenericPreprocessor",
            "dataset_properties": {"intensityproperties": {"0": {
                "mean": norm["mean"], "sd": norm["std"], "percentile_00_5": norm["clip"][0],
                "percentile_99_5": norm["clip"][1]}}}}


def write_cases(stage: Path, n: int, shape, dev, deadline: float) -> dict:
    """The pipeline's synthetic cases as v1 reads them after unpacking: <name>.npy (image, label) float32, and
    the class locations v1's preprocessing samples (<name>_loc<c>.npy); stops early rather than pass `deadline`."""
    stage.mkdir(parents=True, exist_ok=True)
    cases, secs = [], []
    for k in cases_before(n, deadline, secs):
        img, lab = synthetic_arrays(k, shape, dev)
        name = f"synth_{k}"
        np.save(stage / f"{name}.npy", np.stack([img.astype(np.float32), lab.astype(np.float32)]))
        for c, locs in sample_locations(lab, k).items():
            np.save(stage / f"{name}_loc{c}.npy", locs.astype(np.int64))
        cases.append(name)
    return {"cases": cases, "shape": [int(v) for v in shape], "seconds_per_case": [round(v, 2) for v in secs]}


def child_env(s) -> dict:
    """The original's environment: none of the kit's Python variables, `original_path` first on its path, and
    nnUNet_n_proc_DA when `original_workers` sets the augmentation processes (0: v1's default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    path = [p for p in (s.original_path, str(V1_DIR)) if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    if s.original_workers:
        env["nnUNet_n_proc_DA"] = str(s.original_workers)
    return env


def run_side(job: dict, s, cap: float) -> dict:
    """v1_side.py on `job` in the original's interpreter, killed at `cap`: its RESULT, or why there is none."""
    path = Path(job["scratch"]) / "job.json"
    path.write_text(json.dumps(job))
    return child_result([s.original_python or sys.executable, str(SIDE), str(path)], cap, env=child_env(s), tail=3000)


def base_job(c, mode: str, scratch: str) -> dict:
    """What both of v1_side's modes read: the plan, fp16 on a GPU (v1's AMP), the scratch folder."""
    dev = resolve_device(c.s.device)
    return {"mode": mode, "plans": v1_plans(c.plans), "max_features": c.plans["max_num_features"],
            "fp16": dev.type == "cuda", "scratch": scratch}


def scratch_dir(c) -> tempfile.TemporaryDirectory:
    """A scratch folder for v1's files, removed when the section ends however it ends."""
    return tempfile.TemporaryDirectory(prefix="gpu_check_v1_", dir=c.s.scratch_dir or None, ignore_cleanup_errors=True)


def side_record(c, what: str, r: dict, summary) -> dict:
    """The section's record of one run of v1's side: its figures, or an error naming `what` did not finish."""
    if "skipped" in r:
        c.say(f"   {what}: {r['skipped']}")
        return {"status": "error", "reason": f"{what}: {r['skipped']}", "v1": r}
    c.say(f"   {what}: {summary(r)}")
    return {"v1": r}


def original_training(c, deadline: float, rec: dict) -> dict:
    """nnU-Net v1.6.4's trainer with the fork's UNet++ on the pipeline's cases for `original_warmup` +
    `original_steps` iterations, in its own interpreter."""
    with scratch_dir(c) as scratch:
        dev = resolve_device(c.s.device)
        left = deadline - time.monotonic()
        rec["cases"] = cases = write_cases(Path(scratch) / f"{DATA_ID}_stage0", c.s.pipeline_cases,
                                           c.s.pipeline_case_shape, dev, time.monotonic() + 0.3 * left)
        c.say(f"   v1 cases: {len(cases['cases'])} x {cases['shape']}, {cases['seconds_per_case']} s each")
        job = {**base_job(c, "train", scratch), "cases": cases["cases"], "warmup": c.s.original_warmup,
               "steps": c.s.original_steps}
        r = run_side(job, c.s, deadline - time.monotonic())
    return side_record(c, "v1 trainer", r, lambda r: (
        f"{r['samples_per_s']} samples/s ({r['workers']} augmentation processes), waits on data "
        f"{r['data_wait_fraction']:.1%}, {r['peak_memory_gb']} GB"))


def original_inference(c, deadline: float, rec: dict) -> dict:
    """nnU-Net v1.6.4's predict_3D (through the trainer, as its predict does) on one case of `inference_shape`,
    in its own interpreter."""
    with scratch_dir(c) as scratch:
        job = {**base_job(c, "infer", scratch), "shape": [int(v) for v in c.s.inference_shape],
               "mirror_axes": list(c.s.mirror_axes), "step_size": 0.5, "all_in_gpu": c.s.original_all_in_gpu}
        r = run_side(job, c.s, deadline - time.monotonic())
    return side_record(c, "v1 predict_3D", r,
                       lambda r: f"{r['predict_3d_s']} s for {r['tile_passes']} tile passes, {r['peak_memory_gb']} GB")


def kit_training(sections: dict) -> dict | None:
    """The kit's training figure as the Task03 configuration runs (fp16, channels-first; compiled if measured),
    else the first configuration measured (a dry run's)."""
    rows = [r for k in ("training_compile", "training") for r in sections.get(k, {}).get("configs", [])
            if "samples_per_s" in r]
    task03 = [r for r in rows if r.get("precision") == "fp16" and not r.get("channels_last")]
    return (task03 or rows or [None])[0]


def comparison(sections: dict) -> dict:
    """Kit vs original from one run's sections: training samples/s, seconds per median case, their ratios,
    the issue's targets and the moonshot's distance. Rows whose two sides are not both measured are left out."""
    out: dict = {}
    v1_train = sections.get("original_training", {}).get("v1", {})
    kit = kit_training(sections)
    if kit and "samples_per_s" in v1_train:
        ratio = kit["samples_per_s"] / v1_train["samples_per_s"]
        out["training"] = {
            "kit_samples_per_s": kit["samples_per_s"], "kit_config": f"{kit.get('precision')}, "
            f"{'channels-last' if kit.get('channels_last') else 'channels-first'}, "
            f"{'compiled' if kit.get('compile') else 'eager'}, random batches (data_pipeline: how long a fed step waits)",
            "original_samples_per_s": v1_train["samples_per_s"],
            "original_config": f"fp16 AMP, {v1_train['workers']} augmentation processes, "
            f"waits on data {v1_train['data_wait_fraction']:.1%}",
            "ratio": round(ratio, 2), "target_ratio": TRAIN_TARGET, "meets_target": ratio >= TRAIN_TARGET,
            "moonshot_samples_per_s": MOONSHOT["samples_per_s"],
            "moonshot_distance": round(MOONSHOT["samples_per_s"] / kit["samples_per_s"], 2)}
    case = sections.get("inference", {}).get("case")
    v1_inf = sections.get("original_inference", {}).get("v1", {})
    if case and "predict_3d_s" in v1_inf:
        after = "export_write" if "export_write" in case else "export_argmax"
        kit_s = case["predict_total"] + case.get(after, 0.0)
        ratio = kit_s / v1_inf["predict_3d_s"]
        out["inference"] = {
            "kit_case_s": round(kit_s, 2), "kit_config": f"{sections['inference'].get('chosen')}, sliding window + "
            f"{after.replace('_', ' ')}, tile batch {case.get('tile_batch')}",
            "original_case_s": v1_inf["predict_3d_s"],
            "original_config": f"predict_3D, fp16, all_in_gpu={v1_inf['all_in_gpu']}, softmax and argmax on the host",
            "ratio": round(ratio, 3), "target_ratio": INFER_TARGET, "meets_target": ratio <= INFER_TARGET,
            "moonshot_case_s": MOONSHOT["case_s"], "moonshot_distance": round(kit_s / MOONSHOT["case_s"], 2)}
    return out
