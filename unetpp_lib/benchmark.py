"""06_benchmark: every measurement of the kit against the device's own limit, as one JSON.

The measurements themselves are perf/timing.py's; this stage picks them by its settings (the
notebook's parameters), runs them on this run's plan or the Task03 plan, and writes
`benchmark/benchmark.json`.
"""
from __future__ import annotations

import itertools
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import plan, preprocess, scale
from .nn import autotune
from .core.device import cpu_info, device_name, resolve_device
from .core.io import read_json, write_json
from .core.layout import RunLayout
from .core.params import setting
from .perf.timing import (REFERENCE, benchmark_preprocess, inference_timing, matmul_peak_tflops,
                          pipeline_throughput, profile_steps, train_throughput, uncertainty_overhead)


@dataclass
class BenchSettings:
    """What 06_benchmark measures; tiny defaults for a CPU, the real plan on a GPU.

    The fields named like 06_benchmark's parameters are filled from them by `params.build`; the
    last two are for library callers (tests skip the mirrored inference and the preprocessing run)."""

    device: str = setting("device")
    bench_plan: str = setting("bench_plan")  # run: the run's plans.json; task03: the Task03 plan (128^3, batch 2)
    bench_batch_sizes: list = setting("bench_batch_sizes")  # empty: the plan's
    bench_precisions: list = setting("bench_precisions")
    bench_channels_last: list = setting("bench_channels_last")
    bench_compile: list = setting("bench_compile")
    bench_warmup: int = setting("bench_warmup")
    bench_steps: int = setting("bench_steps")
    bench_inference_shape: list = setting("bench_inference_shape")  # empty: the plan's median shape
    bench_head_modes: list = setting("bench_head_modes")
    bench_profile_steps: int = setting("bench_profile_steps")
    bench_scale_cases: int = setting("bench_scale_cases")  # > 0: preprocessing figures on real-size synthetic cases
    bench_uncertainty: bool = setting("bench_uncertainty")  # inference with and without the uncertainty maps
    inference_mirror_axes: list = field(default_factory=lambda: [[0, 1, 2], []])
    preprocess: bool = True


def run_benchmark(run_dir: str | Path, settings: BenchSettings) -> dict:
    """Every measurement of the kit against the device's own limit; writes run_dir/benchmark/benchmark.json."""
    s = settings
    layout = RunLayout(run_dir)
    run, out = layout.root, layout.benchmark
    plans = read_json(layout.pre.plans) if s.bench_plan == "run" else plan.task03_plans()
    dev = resolve_device(s.device)
    result: dict = {"device": device_name(dev), "device_type": dev.type, "plan": s.bench_plan,
                    "patch_size": plans["patch_size"], "settings": asdict(s),
                    "scope": "one process on one device (per-device figures)"}
    if dev.type == "cpu":
        result["cpu"] = cpu_info()
    tuned = {"train": autotune.choose("train", plans, int(plans["batch_size"]), dev),
             "infer": autotune.choose("infer", plans, 2, dev)}
    result["autotune"] = {k: c.as_dict() for k, c in tuned.items()}
    emulated = result.get("cpu", {}).get("bf16") == "emulated"
    peaks = {}
    training = []
    grid = []
    for bs, prec, cl, comp in itertools.product(s.bench_batch_sizes or [plans["batch_size"]], s.bench_precisions,
                                                s.bench_channels_last, s.bench_compile):
        if prec == "auto":  # what training would use here: the probe's precision and layout
            prec, cl = tuned["train"].precision, tuned["train"].channels_last
        if (bs, prec, cl, comp) not in grid:
            grid.append((bs, prec, cl, comp))
    for bs, prec, cl, comp in grid:
        slow = prec == "bf16" and emulated  # a minute a step where bf16 is emulated: one step tells enough
        r = train_throughput(plans, s.device, bs, prec, cl, comp, 0 if slow else s.bench_warmup,
                             1 if slow else s.bench_steps)
        r["auto_choice"] = (prec, cl) == (tuned["train"].precision, tuned["train"].channels_last)
        if slow:
            r["note"] = "bf16 emulated on this CPU: one step, no warm-up"
        pname = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(r["precision"], "fp32")
        if pname not in peaks:
            small = pname == "bf16" and emulated  # n = 1024 takes ~50 s where bf16 is emulated; 256: ~1 s
            peaks[pname] = matmul_peak_tflops(s.device, pname, 256 if small else None, 2 if small else 10)
            if small:
                peaks[pname]["note"] = "bf16 emulated on this CPU: n = 256, 2 repeats"
        r["mfu_measured_peak"] = round(r["achieved_tflops"] / peaks[pname]["measured_tflops"], 6)
        sheet = peaks[pname]["datasheet_tflops"]
        r["mfu_datasheet"] = round(r["achieved_tflops"] / sheet, 6) if sheet else None
        training.append(r)
    result["training"], result["peaks"] = training, peaks
    if s.bench_plan == "run":
        result["data_pipeline"] = pipeline_throughput(run, batches=max(4, s.bench_steps // 5), device=s.device)
    shape = s.bench_inference_shape or plans["median_shape"]
    result["inference"] = [inference_timing(plans, shape, s.device, tuple(m), mode, 1 if mode == "pruned" else None,
                                            choice=tuned["infer"])
                           for m in s.inference_mirror_axes for mode in s.bench_head_modes]
    if s.bench_uncertainty:
        result["uncertainty_overhead"] = uncertainty_overhead(plans, shape, s.device, tuple(s.inference_mirror_axes[0]),
                                                              choice=tuned["infer"])
    if s.preprocess and layout.pre.fingerprint.is_file():
        result["preprocessing"] = benchmark_preprocess(layout.raw.root, layout.pre.root, preprocess.preprocess_task)
    if s.bench_scale_cases:  # in the run's folder: real-size cases take GBs, more than /tmp may hold
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="scale_", dir=out) as work:
            result["preprocessing_at_scale"] = scale.preprocessing_at_scale(work, s.bench_scale_cases)
    if s.bench_profile_steps:
        result["profile"] = profile_steps(plans, out, s.device, s.bench_profile_steps,
                                          precision=tuned["train"].precision,
                                          channels_last=tuned["train"].channels_last)
    result["seed"] = {"table": REFERENCE["seed"]["table"], "caveat": REFERENCE["seed"]["caveat"]}
    write_json(layout.benchmark_json, result)
    return result
