"""Speed and size measurements of the stages (06_benchmark gathers them; each is usable alone).

A stage module like the others, so it imports no sibling stage: the planner (for the Task03
plan) and the preprocessing run it times come in as arguments from the notebook.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numcodecs
import numpy as np
import torch
from scipy import ndimage
from torch.profiler import ProfilerActivity, profile

from . import autotune
from .augment import AugmentConfig, augment_batch, enlarged_size
from .data import PatchSampler, forced_foreground, make_loader
from .device import autocast_dtype, device_name, resolve_device, synchronize
from .infer import export, sliding_window
from .io import Geometry, atomic_path, read_image, read_json, write_json
from .layout import PreLayout, RawLayout, RunLayout
from .losses import head_weights
from .model import build_model, config_from_plans, count_macs
from .resample import resample_image
from .step import train_step
from .transforms import new_shape, preprocess_arrays


def io_floor_seconds(raw_dir: str | Path, cases: list[str], reader: Callable = read_image) -> float:
    """Seconds to read and decompress every raw training image and label once (the I/O floor), by default with
    ITK's reader (SimpleITK, as nnU-Net reads); `reader` takes a path, e.g. the kit's io.read_voxels_strict."""
    raw = RawLayout(raw_dir)
    t0 = time.perf_counter()
    for c in cases:
        reader(raw.image(c))
        reader(raw.label(c))
    return time.perf_counter() - t0


def v2_like_bytes(raw_dir: str | Path, cases: list[str], plans: dict) -> tuple[int, int]:
    """(bytes, voxels) of nnU-Net v2's store for the same data: float32 image, int8 label, Blosc zstd 8 shuffle."""
    codec = numcodecs.Blosc("zstd", 8, numcodecs.Blosc.SHUFFLE)
    raw, total, voxels = RawLayout(raw_dir), 0, 0
    for c in cases:
        img, geom = read_image(raw.image(c))
        lab = read_image(raw.label(c))[0].astype(np.uint8)
        img_p, lab_p, _ = preprocess_arrays(img, lab, geom.spacing, plans)
        total += len(codec.encode(np.ascontiguousarray(img_p, np.float32)))
        total += len(codec.encode(np.ascontiguousarray(lab_p.astype(np.int8))))
        voxels += img_p.size
    return total, voxels


def resample_vs_ndimage(raw_dir: str | Path, case: str, plans: dict) -> dict:
    """Our separable cubic resampling against scipy.ndimage.zoom (order 3) on one case: time and difference."""
    img, geom = read_image(RawLayout(raw_dir).image(case))
    order = plans["transpose_forward"]
    img = np.ascontiguousarray(np.transpose(img.astype(np.float32), order))  # plans' axes order
    shape = new_shape(img.shape, [geom.spacing[i] for i in order], plans["target_spacing"])
    iso = [1.0] * 3  # equal spacings: compare the fully cubic path (no nearest-neighbour axis)
    t0 = time.perf_counter()
    ours = resample_image(img, shape, iso, iso, order=3)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ndimage.zoom(img, np.array(shape) / np.array(img.shape), order=3, mode="nearest", grid_mode=True)
    t_ref = time.perf_counter() - t0
    inner = tuple(slice(2, -2) if n > 8 else slice(None) for n in shape)
    return {"case": case, "shape_in": list(img.shape), "shape_out": shape, "ours_s": round(t_ours, 4),
            "ndimage_zoom_s": round(t_ref, 4), "speedup": round(t_ref / max(t_ours, 1e-9), 2),
            "max_abs_diff_interior_hu": float(np.abs(ours - ref)[inner].max())}


def benchmark_preprocess(raw_dir: str | Path, pre_dir: str | Path, preprocess_task: Callable[..., list[dict]],
                         num_workers: int = 1) -> dict:
    """Preprocess the training set afresh in a scratch folder with `preprocess_task` (03_preprocess's) and
    measure speed, memory and bytes."""
    pre, raw = PreLayout(pre_dir), RawLayout(raw_dir)
    plans, fp = read_json(pre.plans), read_json(pre.fingerprint)
    cases = sorted(fp["cases"])
    raw_bytes = sum(p.stat().st_size for c in cases for p in (raw.image(c), raw.label(c)))
    floor = io_floor_seconds(raw_dir, cases)
    scratch = PreLayout(Path(tempfile.mkdtemp(prefix="bench_pre_")))
    try:
        for src, dst in ((pre.plans, scratch.plans), (pre.fingerprint, scratch.fingerprint)):
            shutil.copy(src, dst)
        t0 = time.perf_counter()
        records = preprocess_task(raw_dir, scratch.root, num_workers=num_workers)
        seconds = time.perf_counter() - t0
        manifest = read_json(scratch.manifest)
        image_label = sum(sum(f.stat().st_size for f in (scratch.case_store(c) / a).rglob("*") if f.is_file())
                          for c in cases for a in ("image", "label"))
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)
    v2_bytes, v2_voxels = v2_like_bytes(raw_dir, cases, plans)
    voxels = manifest["voxels"]
    return {
        "cases": len(cases), "workers": manifest["workers"], "seconds": round(seconds, 3),
        "cases_per_min": round(60 * len(cases) / seconds, 2), "raw_mb": round(raw_bytes / 1e6, 3),
        "raw_mb_per_s": round(raw_bytes / 1e6 / seconds, 3), "io_floor_s": round(floor, 3),
        "x_io_floor": round(seconds / max(floor, 1e-9), 2),
        "peak_rss_mb_per_worker": max(r["peak_rss_mb"] for r in records),
        "preprocessed_voxels": voxels, "bytes_per_voxel": manifest["bytes_per_voxel"],
        "image_label_bytes_per_voxel": round(image_label / voxels, 4),
        "nnunet_v2_like_bytes_per_voxel": round(v2_bytes / v2_voxels, 4),
        "x_nnunet_v2_bytes": round(manifest["bytes_per_voxel"] / (v2_bytes / v2_voxels), 3),
        "resampling": resample_vs_ndimage(raw_dir, max(cases, key=lambda c: np.prod(fp["cases"][c]["shape"])), plans),
    }


def train_throughput(plans: dict, device: str = "auto", batch_size: int | None = None, precision: str = "auto",
                     channels_last: bool = False, compile: bool = False, warmup: int = 10, steps: int = 100,
                     compile_backend: str = "inductor") -> dict:
    """The seed's FPS: `warmup` steps, then `steps` timed SGD steps on device-resident random batches.

    FPS = batch / mean step time; achieved FLOP/s = 3 x 2 x forward multiply-adds x samples/s.
    `first_step_s` is the first warm-up step: with `compile`, mostly compilation.
    """
    dev = resolve_device(device)
    B, patch = int(batch_size or plans["batch_size"]), [int(p) for p in plans["patch_size"]]
    net = build_model(plans).to(dev)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    model = torch.compile(net, backend=compile_backend) if compile else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    dtype = autocast_dtype(precision, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    weights = head_weights(net.cfg.depth)
    x = torch.randn(B, plans["num_input_channels"], *patch, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, plans["num_classes"], (B, *patch), device=dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(warmup + steps):
        synchronize(dev)
        t0 = time.perf_counter()
        train_step(model, opt, scaler, x, y, weights, 12.0, dtype)
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    first, t = times[0], np.array(times[warmup:])
    macs = count_macs(config_from_plans(plans), patch)
    sps = B / t.mean()
    return {"device": device_name(dev), "batch_size": B, "patch_size": patch, "precision": str(dtype or "fp32"),
            "channels_last": channels_last, "compile": compile, "steps": steps, "first_step_s": round(first, 4),
            "step_s_median": round(float(np.median(t)), 4), "step_s_p10_p90": [round(float(v), 4) for v in np.percentile(t, [10, 90])],
            "samples_per_s": round(float(sps), 3), "forward_macs_per_sample": int(macs),
            "forward_gmac_per_sample": round(macs / 1e9, 2),
            "achieved_tflops": round(6 * macs * sps / 1e12, 6),  # 6 places: tiny CPU models are ~1e-4
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None}


def pipeline_throughput(run_dir: str | Path, fold: int = 0, batches: int = 20, num_workers: int = 2,
                        device: str = "cpu", augment: bool = True) -> dict:
    """Samples/s the data pipeline alone delivers: loader workers reading the store + augmentation on `device`."""
    pre = RunLayout(run_dir).pre
    plans, splits = read_json(pre.plans), read_json(pre.splits)
    return loader_throughput(pre.root, splits[fold]["train"], plans, batches, num_workers, device, augment)


def training_batches(pre_dir: str | Path, cases: list[str], plans: dict, num_workers: int, pin: bool):
    """(iterator of the training loader's batches, augmentation config, enlarged box) for `cases` of a store."""
    cfg = AugmentConfig(dummy_2d=bool(plans.get("do_dummy_2D_data_aug", False)))
    box = enlarged_size(plans["patch_size"], cfg)
    sampler = PatchSampler(pre_dir, cases, box, plans["patch_size"])
    return iter(make_loader(sampler, forced_foreground(int(plans["batch_size"])), 0, num_workers, pin)), cfg, box


def loader_throughput(pre_dir: str | Path, cases: list[str], plans: dict, batches: int = 20, num_workers: int = 2,
                      device: str = "cpu", augment: bool = True) -> dict:
    """Samples/s of loader workers reading enlarged boxes of `cases` from a store + augmentation on `device`."""
    dev, B, patch = resolve_device(device), int(plans["batch_size"]), plans["patch_size"]
    it, cfg, box = training_batches(pre_dir, cases, plans, num_workers, dev.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    next(it)  # workers started
    t0 = time.perf_counter()
    for _ in range(batches):
        img, lab = next(it)
        img, lab = img.to(dev).float(), lab.to(dev).long()
        if augment:
            augment_batch(img, lab, patch, plans["num_classes"], cfg, gen)
    synchronize(dev)
    seconds = time.perf_counter() - t0
    return {"batches": batches, "batch_size": B, "loader_workers": num_workers, "augment_device": str(dev),
            "box": box, "samples_per_s": round(B * batches / seconds, 3)}


def inference_timing(plans: dict, shape, device: str = "auto", mirror_axes=(0, 1, 2), mode: str = "deepest",
                     level: int | None = None, step: float = 0.5, tile_batch: int = 2, write: bool = True,
                     compile: bool = False, compile_backend: str = "inductor",
                     choice: autotune.Choice | None = None) -> dict:
    """Seconds per stage for one synthetic case of `shape` voxels at target spacing (random weights).

    `write=False` times the export up to the NIfTI write (argmax on the device, copy to the host) only.
    `compile`: the forward pass compiled (infer.compiled_forward), by a first call on two tiles outside the
    timed stages (`compile_s`). `choice`: autotune's precision and layout (default: fp32 on a CPU, fp16 on a GPU,
    channels-first)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    cl = bool(choice and choice.channels_last)
    net = build_model(plans).to(dev).eval().to(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
    shape, patch = [int(s) for s in shape], plans["patch_size"]
    run = dict(tile_batch=tile_batch, dtype=choice.dtype if choice else autocast_dtype("auto", dev), compile=compile,
               compile_backend=compile_backend, channels_last=cl)
    t: dict = {}
    if compile:
        t0 = time.perf_counter()
        sliding_window(net, torch.randn(1, patch[0] + patch[0] // 2, *patch[1:]), patch, plans["num_classes"], step,
                       mirror_axes, mode, level, **run)
        t["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = sliding_window(net, torch.randn(1, *shape), patch, plans["num_classes"], step, mirror_axes, mode, level,
                           timings=t, **run)
    t["predict_total"] = time.perf_counter() - t0
    geom = Geometry(tuple(shape), tuple(plans["target_spacing"]), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    props = {"geometry": geom, "crop_box": [[0, s] for s in shape], "transpose_forward": [0, 1, 2],
             "shape_after_crop": shape, "spacing_transposed": list(plans["target_spacing"]),
             "target_spacing": list(plans["target_spacing"])}
    with tempfile.TemporaryDirectory(prefix="bench_inf_") as scratch:
        t0 = time.perf_counter()
        if write:
            export(probs, props, Path(scratch) / "case.nii.gz")
        else:
            probs.argmax(0).to(torch.uint8).cpu().numpy()
        t["export_write" if write else "export_argmax"] = time.perf_counter() - t0
    around = t["sliding_window"] + t.get("export_write", t.get("export_argmax", 0.0))
    peak = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None
    return {"device": device_name(dev), "shape": shape, "patch_size": plans["patch_size"], "mode": mode,
            "level": level, "mirrorings": 2 ** len(mirror_axes), "tile_batch": tile_batch, "compile": compile,
            "precision": str(run["dtype"] or "fp32"), "channels_last": cl,
            **{k: round(v, 6) for k, v in t.items()},  # microseconds: ratios recomputed from them hold
            "tiles_per_s": round(t["tiles"] / t["network"], 2), "peak_memory_gb": peak,
            "around_network_fraction": round(around / t["network"], 4)}


# ----------------------------------------------------------------------------- the limit
# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s.
DATASHEET_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, "H100 HBM3": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}, "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, "V100": {"fp16": 125.0, "fp32": 15.7},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}, "Ascend 910A": {"fp16": 256.0},
}


def datasheet_peak(device_name: str, precision: str) -> float | None:
    """Datasheet TFLOP/s of a known card in a precision (None when unknown, e.g. CPUs)."""
    name = device_name.replace("NVIDIA ", "")
    for card, peaks in sorted(DATASHEET_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if all(part in name for part in card.split()):
            return peaks.get(precision)
    return None


def matmul_peak_tflops(device: str = "auto", precision: str = "fp32", n: int | None = None, repeats: int = 10) -> dict:
    """The device's own limit, measured: TFLOP/s of a large square matmul in the given precision."""
    dev = resolve_device(device)
    n = n or (8192 if dev.type != "cpu" else 1024)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b  # warm-up
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(dev)
    tflops = 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12
    name = device_name(dev)
    return {"device": name, "precision": precision, "n": n, "measured_tflops": round(tflops, 6),
            "datasheet_tflops": datasheet_peak(name, precision)}


# ----------------------------------------------------------------------------- profiler
def profile_steps(plans: dict, out_dir: str | Path | None, device: str = "auto", steps: int = 3, top: int = 15,
                  precision: str = "fp32", channels_last: bool = False) -> dict:
    """torch.profiler over a few training steps (after one untimed): top operators by time, as rows and as text,
    and a Chrome trace file in `out_dir` (None: no trace)."""
    dev = resolve_device(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = build_model(plans).to(dev).to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    x = torch.randn(int(plans["batch_size"]), plans["num_input_channels"], *plans["patch_size"], device=dev)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, plans["num_classes"], (x.shape[0], *plans["patch_size"]), device=dev)
    weights, dtype = head_weights(net.cfg.depth), autocast_dtype(precision, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    train_step(net, opt, scaler, x, y, weights, 12.0, dtype)  # warm-up (cuDNN's algorithm search) outside the trace
    with profile(activities=profiler_activities(dev)) as prof:
        for _ in range(steps):
            train_step(net, opt, scaler, x, y, weights, 12.0, dtype)
        synchronize(dev)
    out = {"steps": steps, "precision": str(dtype or "fp32"), "channels_last": channels_last, **top_operators(prof, dev, top)}
    if out_dir is not None:
        trace = Path(out_dir) / "profile_trace.json"
        with atomic_path(trace) as tmp:
            prof.export_chrome_trace(str(tmp))
        out["trace"] = str(trace)
    return out


def profiler_activities(dev: torch.device) -> list:
    """What torch.profiler records on this device: the host always, CUDA kernels on a GPU. Also quiets libkineto's
    'USDT: profiler_start/stop' lines, which it writes to the terminal past Python (unless KINETO_LOG_LEVEL is set)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # read when the first profiler starts
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])


def top_operators(prof, dev: torch.device, top: int) -> dict:
    """The `top` operators of a finished profile by self time on the device (host time on a CPU): rows and text."""
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    events = sorted(averages, key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    total = sum(getattr(e, key, 0) for e in averages) or 1
    return {"time_column": key, "table": averages.table(sort_by=key, row_limit=top, max_name_column_width=60),
            "top_operators": [{"name": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1000, 3),
                               "share": round(getattr(e, key, 0) / total, 4)} for e in events]}


# ----------------------------------------------------------------------------- the seed, for comparison
SEED_TABLE = [  # (run, liver Dice, tumour Dice, FPS samples/s) from the seed tutorial
    {"run": "V100 x1, bs=1 (broken loss)", "liver_dice": 6.86, "tumour_dice": 0.08, "samples_per_s": 1.931},
    {"run": "V100 x1, bs=2 (broken loss)", "liver_dice": None, "tumour_dice": None, "samples_per_s": 1.450},
    {"run": "V100 x8, bs=8 (total)", "liver_dice": 96.59, "tumour_dice": 71.43, "samples_per_s": 6.922},
    {"run": "V100 x8, bs=16 (total)", "liver_dice": 96.68, "tumour_dice": 70.43, "samples_per_s": 6.283},
    {"run": "Ascend 910A x1, bs=1 (broken loss)", "liver_dice": 6.02, "tumour_dice": 0.05, "samples_per_s": 2.477},
    {"run": "Ascend 910A x8, bs=8 (total)", "liver_dice": 96.67, "tumour_dice": 71.42, "samples_per_s": 4.209},
]
SEED_CAVEAT = ("The seed's 1-device FPS was measured with its broken loss (only the X(0,1) head supervised), "
               "so backward ran through under 1 % of the weights; a fixed V100 step is estimated at ~0.9 samples/s. "
               "Its x8 figures are totals over 8 cards.")


# ----------------------------------------------------------------------------- everything, as one JSON
@dataclass
class BenchSettings:
    """What 06_benchmark measures; tiny defaults for a CPU, the real plan on a GPU.

    The fields named like 06_benchmark's parameters are filled from them by `params.build`; the
    last two are for library callers (tests skip the mirrored inference and the preprocessing run)."""

    device: str = "auto"
    bench_plan: str = "run"  # run: the run's plans.json; task03: the Task03 plan (128^3, batch 2)
    bench_batch_sizes: list = field(default_factory=list)  # empty: the plan's
    bench_precisions: list = field(default_factory=lambda: ["auto"])
    bench_channels_last: list = field(default_factory=lambda: [False])
    bench_compile: list = field(default_factory=lambda: [False])
    bench_warmup: int = 10
    bench_steps: int = 100
    bench_inference_shape: list = field(default_factory=list)  # empty: the plan's median shape
    bench_head_modes: list = field(default_factory=lambda: ["deepest", "average", "pruned"])
    bench_profile_steps: int = 3
    bench_scale_cases: int = 0  # > 0: preprocessing figures on that many real-size synthetic cases
    inference_mirror_axes: list = field(default_factory=lambda: [[0, 1, 2], []])
    preprocess: bool = True


def run_benchmark(run_dir: str | Path, settings: BenchSettings, task03_plans: Callable[[], dict] | None = None,
                  preprocess_task: Callable[..., list[dict]] | None = None,
                  preprocessing_at_scale: Callable[..., dict] | None = None) -> dict:
    """Every measurement of the kit against the device's own limit; writes run_dir/benchmark/benchmark.json.

    `task03_plans` (02_plan's) is needed for `bench_plan == "task03"`; `preprocess_task` (03_preprocess's)
    for `settings.preprocess`; `preprocessing_at_scale` (scale.py's) for `settings.bench_scale_cases`.
    """
    s = settings
    layout = RunLayout(run_dir)
    run, out = layout.root, layout.benchmark
    if s.bench_plan != "run" and task03_plans is None:
        raise ValueError(f"bench_plan {s.bench_plan!r} needs the planner: pass task03_plans=plan.task03_plans")
    if s.preprocess and preprocess_task is None:
        raise ValueError("settings.preprocess needs preprocess_task=preprocess.preprocess_task")
    if s.bench_scale_cases and preprocessing_at_scale is None:
        raise ValueError("bench_scale_cases needs preprocessing_at_scale=scale.preprocessing_at_scale")
    plans = read_json(layout.pre.plans) if s.bench_plan == "run" else task03_plans()
    dev = resolve_device(s.device)
    result: dict = {"device": device_name(dev), "device_type": dev.type, "plan": s.bench_plan,
                    "patch_size": plans["patch_size"], "settings": asdict(s),
                    "scope": "one process on one device (per-device figures)"}
    if dev.type == "cpu":
        result["cpu"] = autotune.cpu_info()
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
    if s.preprocess and layout.pre.fingerprint.is_file():
        result["preprocessing"] = benchmark_preprocess(layout.raw.root, layout.pre.root, preprocess_task)
    if s.bench_scale_cases:  # in the run's folder: real-size cases take GBs, more than /tmp may hold
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="scale_", dir=out) as work:
            result["preprocessing_at_scale"] = preprocessing_at_scale(work, s.bench_scale_cases)
    if s.bench_profile_steps:
        result["profile"] = profile_steps(plans, out, s.device, s.bench_profile_steps, precision=tuned["train"].precision,
                                          channels_last=tuned["train"].channels_last)
    result["seed"] = {"table": SEED_TABLE, "caveat": SEED_CAVEAT}
    write_json(layout.benchmark_json, result)
    return result
