"""The GPU check's measuring sections: each takes the running check, a deadline and its record, and measures.

A section is `fn(c, deadline, rec) -> dict | None`: `c` is the running check (see `Run`), `deadline` a
time.monotonic() it must finish by, `rec` its record in gpu_check.json, filled as it goes so that figures
measured before a failure or a kill stay. What it returns is merged into `rec`. The command line, the budget
and the report are unetpp_lib/gpu_check.py's; this module never imports it. The data pipeline's store and
fed training steps are measured by pipeline.py.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from . import candidates as candidates_mod, timing, vs_original
from .child import child_result, run_captured
from .pipeline import fed_training, synthetic_store
from ..core.device import autocast_dtype, device_name, resolve_device
from ..nn.infer import sliding_window, tile_starts
from ..nn.model import build_model

# The kit's NIfTI I/O needs SimpleITK (a 53 MB wheel to carry to a bare GPU machine); without it the check
# still measures everything and skips only the export write.
SITK_MISSING = importlib.util.find_spec("SimpleITK") is None
PREC = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}
# Compiled configurations run in children of the check's own command line (gpu_check's `--train-one` and
# `--infer-probe`): named, not imported, so that this module does not import the command.
CHILD = [sys.executable, "-m", "unetpp_lib.gpu_check"]


class Run(Protocol):
    """What a section uses of the running check (gpu_check.Check): settings, results so far, log and files."""

    s: Any  # the gpu_check.CheckSettings of this run
    plans: dict  # the Task03 plan, shrunk by the settings' plan_overrides for a dry run
    result: dict

    def say(self, msg: str) -> None:
        """Progress line to stdout and gpu_check.log."""

    def text(self, key: str, body: str) -> None:
        """Write one of DIR's text files (a gpu_check.FILES key) atomically."""

    def save(self) -> None:
        """gpu_check.json and gpu_check.md as they stand."""


Section = Callable[[Run, float, dict], dict | None]  # fn(c, deadline, rec)


def run_child(flag: str, job: dict, cap: float) -> dict:
    """The RESULT dict the check's own child (`gpu_check FLAG JOB`) printed, or why it has none (child_result)."""
    return child_result([*CHILD, flag, json.dumps(job)], cap)


def _free(dev: torch.device) -> None:
    """Give cached device memory back between configurations."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections
def facts(c: Run, deadline: float, _rec: dict) -> dict:
    """nvidia-smi, versions, the device, measured matmul peaks (bf16, fp16, fp32)."""
    dev = resolve_device(c.s.device)
    smi = shutil.which("nvidia-smi")
    query = "name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.mem,pcie.link.gen.max"
    info: dict = {"nvidia_smi": None}
    if smi:
        rc, csv = run_captured([smi, f"--query-gpu={query}", "--format=csv,noheader"], 30)
        first = csv.strip().splitlines()[0] if rc == 0 and csv.strip() else ""
        info["nvidia_smi"] = dict(zip(query.split(","), [v.strip() for v in first.split(",")])) if first else csv
        c.text("smi", run_captured([smi], 30)[1] + "\n" + run_captured([smi, "-q"], 30)[1])
    else:
        c.text("smi", "nvidia-smi not found on this machine\n")
    props = torch.cuda.get_device_properties(dev) if dev.type == "cuda" else None
    info.update({
        "device": device_name(dev), "device_type": dev.type, "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None, "python": platform.python_version(),
        "numpy": np.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "simpleitk": not SITK_MISSING,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1) if props else None,
        "multiprocessors": props.multi_processor_count if props else None,
        "capability": f"{props.major}.{props.minor}" if props else None})
    c.result["device"] = info["device"]
    peaks = {}
    for prec in ("bf16", "fp16", "fp32"):
        if time.monotonic() < deadline:
            # 50 products on a GPU (~0.1 s in bf16): long enough for the clocks to rise, as in training
            peaks[prec] = timing.matmul_peak_tflops(c.s.device, prec, c.s.matmul_n, 50 if dev.type == "cuda" else 2)
            c.say(f"   matmul {prec}: {peaks[prec]['measured_tflops']} TFLOP/s")
    c.result["peaks"] = peaks
    return {**info, "peaks": peaks}


def with_mfu(c: Run, r: dict) -> dict:
    """A train_throughput record with MFU against the peak measured in this run for its precision."""
    r["precision"] = PREC.get(r["precision"], "fp32")
    peak = c.result.get("peaks", {}).get(r["precision"])
    r["mfu_measured_peak"] = round(r["achieved_tflops"] / peak["measured_tflops"], 4) if peak else None
    sheet = peak and peak["datasheet_tflops"]
    r["mfu_datasheet"] = round(r["achieved_tflops"] / sheet, 4) if sheet else None
    r["step_s_p10"], r["step_s_p50"], r["step_s_p90"] = r["step_s_p10_p90"][0], r["step_s_median"], r["step_s_p10_p90"][1]
    return r


def grid(c: Run, compiled: bool) -> list[dict]:
    """The (precision, channels-last) configurations to time, with or without torch.compile."""
    if compiled not in c.s.compile:
        return []
    return [{"precision": p, "channels_last": cl, "compile": compiled}
            for p, cl in itertools.product(c.s.precisions, c.s.channels_last)]


def training(c: Run, deadline: float, rec: dict) -> None:
    """The eager grid in this process; a configuration that would not fit (the last one's time) is skipped."""
    plans, dev = c.plans, resolve_device(c.s.device)
    rec["plan"] = {k: plans[k] for k in ("patch_size", "batch_size", "base_num_features")}
    rows, last = rec.setdefault("configs", []), 0.0
    for cfg in grid(c, False):
        if time.monotonic() + 1.2 * last > deadline:
            rows.append({**cfg, "skipped": f"would not fit: the last configuration took {last:.0f} s"})
            continue
        t0 = time.monotonic()
        try:
            r = with_mfu(c, timing.train_throughput(plans, c.s.device, None, cfg["precision"], cfg["channels_last"],
                                                       False, c.s.warmup, c.s.steps))
            c.say(f"   {cfg}: {r['samples_per_s']} samples/s, p50 {r['step_s_median']} s, {r['peak_memory_gb']} GB")
        except RuntimeError as e:  # out of memory, an unsupported kernel: the next configuration may still run
            r = {**cfg, "skipped": f"{type(e).__name__}: {str(e)[:300]}"}
            c.say(f"   {cfg}: {r['skipped']}")
        last = time.monotonic() - t0
        rows.append(r)
        c.save()
        _free(dev)


def training_compile(c: Run, deadline: float, rec: dict) -> dict:
    """Each compiled configuration in a child process, killed at min(compile_config_cap_s, the section's time)."""
    plans, rows = c.plans, rec.setdefault("configs", [])
    _free(resolve_device(c.s.device))
    for cfg in grid(c, True):
        cap = min(c.s.compile_config_cap_s, deadline - time.monotonic())
        job = {"plans": plans, "device": c.s.device, "precision": cfg["precision"], "channels_last": cfg["channels_last"],
               "warmup": c.s.warmup, "steps": c.s.steps, "backend": c.s.compile_backend}
        r = run_child("--train-one", job, cap)
        if "skipped" in r:
            rows.append({**cfg, **r})
            c.say(f"   {cfg}: {r['skipped']}")
        else:
            r = with_mfu(c, r)
            r.update(compile_backend=c.s.compile_backend, compile_s=round(r["first_step_s"] - r["step_s_median"], 2))
            rows.append(r)
            c.say(f"   {cfg}: compile {r['compile_s']} s, {r['samples_per_s']} samples/s")
        c.save()
    if not any("samples_per_s" in r for r in rows):
        return {"status": "error" if rows else "skipped", "reason": rows[0]["skipped"] if rows else "compile: [false]"}
    return {}


def infer_variant(plans: dict, s: Any, compiled: bool, case: bool = False) -> dict:
    """Eager or compiled (timing.inference_timing's figures): a first call on two tiles (one batch of 2), which
    pays for cuDNN's search and any compilation, then the same two tiles again (the probe) or the median case.
    Compiled, inference_timing makes that first call itself (its `compile_s`); eager, it is made here."""
    patch = plans["patch_size"]
    two = [patch[0] + patch[0] // 2] + list(patch[1:])
    run = functools.partial(timing.inference_timing, plans, device=s.device, mirror_axes=tuple(s.mirror_axes),
                            tile_batch=s.tile_batch, compile=compiled, compile_backend=s.compile_backend)
    t0 = time.perf_counter()
    if not compiled:
        run(two, write=False)
    warm_up = time.perf_counter() - t0
    r = run(s.inference_shape if case else two, write=case and not SITK_MISSING)
    first = r["compile_s"] if compiled else warm_up
    r["first_call_s"] = round(first, 2)
    if not case:  # what the first call took more: mostly the compilation when compiled
        r.update({"compile_s" if compiled else "warmup_s": round(first - r["predict_total"], 2),
                  "per_tile_ms": round(1000 * r["network"] / r["tiles"], 3)})
    elif SITK_MISSING:
        r["export_write_skipped"] = "SimpleITK not installed: timed up to the argmax on the host, no NIfTI write"
    return r


def inference(c: Run, deadline: float, rec: dict) -> dict:
    """One median case with all mirrorings: a two-tile probe per variant of `inference_compile` (eager here, the
    compiled one in a child killed at its cap), then the case with the variant faster per tile whose estimate fits."""
    plans, dev = c.plans, resolve_device(c.s.device)
    rec["tile_passes"] = tiles = int(np.prod([len(tile_starts(int(n), p)) for n, p in
                                              zip(c.s.inference_shape, plans["patch_size"])])) * 2 ** len(c.s.mirror_axes)
    # recorded, and handed to the child: sliding_window turns cuDNN's autotuner on for CUDA in any case
    rec["cudnn_benchmark"], probes = torch.backends.cudnn.benchmark, rec.setdefault("probes", {})
    job = {"plans": plans, "settings": dataclasses.asdict(c.s), "cudnn_benchmark": rec["cudnn_benchmark"]}
    for compiled in sorted(set(c.s.inference_compile)):  # eager first: a compile that fails must not cost it
        name, cap = ("compiled" if compiled else "eager"), min(c.s.compile_config_cap_s, deadline - time.monotonic())
        p = run_child("--infer-probe", job, cap) if compiled else infer_variant(plans, c.s, False)
        if "per_tile_ms" in p:  # the case is preceded by a first call like the probe's (compilation included)
            p["estimate_s"] = round(1.15 * tiles * p["per_tile_ms"] / 1000 + p["first_call_s"] + 10, 1)
            c.say(f"   probe {name}: {p['per_tile_ms']:.1f} ms per tile pass, first call {p['first_call_s']} s; "
                  f"case estimate {p['estimate_s']:.0f} s for {tiles} tile passes")
        else:
            c.say(f"   probe {name}: {p['skipped']}")
        probes[name] = p
        c.save()
        _free(dev)
    why = rec.setdefault("case_not_run", {})  # the faster per tile first: a process compiles once for all its cases
    for name in sorted((k for k in probes if "per_tile_ms" in probes[k]), key=lambda k: probes[k]["per_tile_ms"]):
        left = deadline - time.monotonic()
        if probes[name]["estimate_s"] > left:
            why[name] = f"estimated {probes[name]['estimate_s']:.0f} s does not fit the {left:.0f} s left"
            continue
        try:
            rec["case"], rec["chosen"] = infer_variant(plans, c.s, name == "compiled", case=True), name
            return {}
        except Exception as e:  # a compiled graph failing in this process: the eager variant may still fit
            why[name] = f"{type(e).__name__}: {str(e)[:300]}"
            c.say(f"   case {name}: {why[name]}")
        finally:
            _free(dev)
    return {"status": "skipped" if why and all("does not fit" in v for v in why.values()) else "error",
            "reason": "; ".join(f"{k}: {v}" for k, v in why.items()) or "no probe gave a figure"}


def data_pipeline(c: Run, deadline: float, rec: dict) -> None:
    """A scratch store of Task03-sized cases, loader workers (all cores) + augmentation, then fed training steps."""
    plans, dev = c.plans, resolve_device(c.s.device)
    workers = c.s.pipeline_workers or os.cpu_count() or 1
    # outside DIR: a run killed mid-way must not leave hundreds of chunk files among the results
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_store_", dir=c.s.scratch_dir or None))
    try:
        remaining = deadline - time.monotonic()
        rec["store"] = store = synthetic_store(scratch, c.s.pipeline_cases, c.s.pipeline_case_shape,
                                               plans["patch_size"], dev, time.monotonic() + 0.4 * remaining)
        c.say(f"   store: {len(store['cases'])} cases, {store['seconds_per_case']} s each, "
              f"{store['bytes_per_voxel']} B/voxel")
        rec["loader"] = loader = timing.loader_throughput(scratch, store["cases"], plans, c.s.pipeline_batches,
                                                             workers, c.s.device)
        c.say(f"   loader + augmentation: {loader['samples_per_s']} samples/s with {workers} workers")
        c.save()
        rec["fed_training"] = fed = fed_training(scratch, store["cases"], plans, c.s, workers, deadline)
        c.say(f"   fed training: {fed['samples_per_s']} samples/s, waits on data {fed['gpu_waits_on_data_fraction']:.1%}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _free(dev)


def profile(c: Run, deadline: float, rec: dict) -> None:
    """torch.profiler top operators: training steps (first precision, channels-last) and inference tiles."""
    plans, dev = c.plans, resolve_device(c.s.device)
    rec["train"] = train = timing.profile_steps(plans, None, c.s.device, c.s.profile_steps, c.s.profile_rows,
                                                   c.s.precisions[0], True)
    c.text("profile_train", f"training step x {train['steps']}, {train['precision']}, channels-last, "
           f"plan patch {plans['patch_size']} batch {plans['batch_size']}\n\n{train.pop('table')}")
    c.save()
    net, dtype = build_model(plans).to(dev).eval(), autocast_dtype(c.s.precisions[0], dev)
    img, shape = torch.randn(1, *c.s.profile_infer_shape), c.s.profile_infer_shape
    sliding_window(net, img, plans["patch_size"], plans["num_classes"], 0.5, (), tile_batch=c.s.tile_batch, dtype=dtype)
    with torch.profiler.profile(activities=timing.profiler_activities(dev)) as prof:
        sliding_window(net, img, plans["patch_size"], plans["num_classes"], 0.5, tuple(c.s.mirror_axes),
                       tile_batch=c.s.tile_batch, dtype=dtype)
    infer = timing.top_operators(prof, dev, c.s.profile_rows)
    c.text("profile_infer", f"sliding window over {shape}, mirror axes {c.s.mirror_axes}, tile batch "
           f"{c.s.tile_batch}, {dtype}\n\n{infer.pop('table')}")
    _free(dev)
    rec["inference"] = {"shape": shape, **infer}


def pytest_gpu(c: Run, deadline: float, _rec: dict) -> dict:
    """`pytest -m gpu` in a child process; its output goes to pytest_gpu.log."""
    cmd = [sys.executable, "-m", "pytest", *c.s.pytest_args, "-p", "no:cacheprovider"]
    rc, out = run_captured(cmd, deadline - time.monotonic())
    c.text("pytest", f"$ {' '.join(cmd)}\n\n{out}")
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if ln.strip()), "")
    rec = {"command": cmd, "exit_code": rc, "summary": summary}
    if SITK_MISSING:
        rec["note"] = "SimpleITK is not installed: tests/conftest.py imports it (synthetic -> io), so collection fails"
    if rc is None:
        rec.update(status="error", reason="killed at the section's cap")
    elif rc not in (0, 5):  # 5: no test selected
        rec.update(status="error", reason=f"pytest exit code {rc}: {summary}")
    return rec


def candidates(c: Run, deadline: float, rec: dict) -> None:
    """Speed-up candidates for the norm (perf/candidates.py): their rounding against PyTorch's kernel in the
    Task03 configuration's precision, and their eager training step and tile forward beside it."""
    candidates_mod.measure(rec, c.plans, c.s.device, c.s.precisions[0], c.s.candidates, c.s.tile_batch, c.s.warmup,
                           c.s.steps, deadline, c.say, c.save)
    _free(resolve_device(c.s.device))


# run in gpu_check.ORDER (most important first)
SECTIONS: dict[str, Section] = {
    "facts": facts, "training": training, "original_training": vs_original.original_training, "inference": inference,
    "original_inference": vs_original.original_inference, "training_compile": training_compile, "data_pipeline": data_pipeline,
    "profile": profile, "pytest_gpu": pytest_gpu, "candidates": candidates}
