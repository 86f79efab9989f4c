"""Speed and size measurements (06_benchmark and the GPU check gather them; each is usable alone).

Training throughput, inference timing, the data pipeline, the preprocessing run, matmul peaks and the
profiler's top operators. Vendor datasheet peaks and the seed's table are data: reference_figures.json.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numcodecs
import numpy as np
import torch
from scipy import ndimage
from torch.profiler import ProfilerActivity, profile

from ..nn import autotune
from ..nn.augment import AugmentConfig, augment_batch, enlarged_size
from ..nn.data import PatchSampler, forced_foreground, make_loader
from ..core.device import autocast_dtype, device_name, resolve_device, synchronize
from ..nn.infer import export, sliding_window
from ..core.io import Geometry, atomic_path, read_image, read_json
from ..core.layout import PredLayout, PreLayout, RawLayout, RunLayout
from ..nn.losses import head_weights
from ..nn.model import build_model, config_from_plans, count_macs
from ..prep.resample import resample_image
from ..nn.step import train_step
from ..prep.transforms import new_shape, preprocess_arrays



REFERENCE = json.loads((Path(__file__).with_name("reference_figures.json")).read_text())


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


def synced_times(fn: Callable[[], object], dev: torch.device, n: int) -> list[float]:
    """Seconds of each of n calls of fn(), the device synchronised before and after each."""
    times = []
    for _ in range(n):
        synchronize(dev)
        t0 = time.perf_counter()
        fn()
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    return times


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
    times = synced_times(lambda: train_step(model, opt, scaler, x, y, weights, 12.0, dtype), dev, warmup + steps)
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
                     choice: autotune.Choice | None = None, uncertainty: bool = False) -> dict:
    """Seconds per stage for one synthetic case of `shape` voxels at target spacing (random weights).

    `uncertainty`: with the uncertainty channel accumulated and its three maps written too (`--save-uncertainty`).
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
               compile_backend=compile_backend, channels_last=cl, uncertainty=uncertainty)
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
            export(probs, props, Path(scratch) / "case.nii.gz", maps_to=PredLayout(scratch) if uncertainty else None)
        else:
            probs[:plans["num_classes"]].argmax(0).to(torch.uint8).cpu().numpy()
        t["export_write" if write else "export_argmax"] = time.perf_counter() - t0
    around = t["sliding_window"] + t.get("export_write", t.get("export_argmax", 0.0))
    peak = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None
    return {"device": device_name(dev), "shape": shape, "patch_size": plans["patch_size"], "mode": mode,
            "level": level, "mirrorings": 2 ** len(mirror_axes), "tile_batch": tile_batch, "compile": compile,
            "uncertainty": uncertainty,
            "precision": str(run["dtype"] or "fp32"), "channels_last": cl,
            **{k: round(v, 6) for k, v in t.items()},  # microseconds: ratios recomputed from them hold
            "tiles_per_s": round(t["tiles"] / t["network"], 2), "peak_memory_gb": peak,
            "around_network_fraction": round(around / t["network"], 4)}


def uncertainty_overhead(plans: dict, shape, device: str = "auto", mirror_axes=(0, 1, 2), repeats: int = 2,
                         choice: autotune.Choice | None = None) -> dict:
    """Inference of one case (prediction and export with its write) without and with the uncertainty maps,
    alternated `repeats` times, the fastest of each kept: {"without_s", "with_s", "overhead_pct", ...}."""
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for on in (False, True):
            r = inference_timing(plans, shape, device, mirror_axes, choice=choice, uncertainty=on)
            best[on] = min(best[on], r["predict_total"] + r["export_write"])
    return {"shape": [int(v) for v in shape], "mirrorings": 2 ** len(mirror_axes), "repeats": repeats,
            "without_s": round(best[False], 4), "with_s": round(best[True], 4),
            "overhead_pct": round(100 * (best[True] / best[False] - 1), 2),
            "what": "predict + export + write of one case; with: the uncertainty channel and its three maps"}


# ----------------------------------------------------------------------------- the limit
DATASHEET_TFLOPS = REFERENCE["datasheet_tflops"]["cards"]  # dense tensor-core peaks, TFLOP/s


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
