"""Speed-up candidates for the Task03 network, measured before any is adopted (issue 26, item 2).

A candidate replaces one part of the kit's UNet++ with a faster formulation of the same arithmetic. It is
adopted only if it is faster on the GPU *and* its rounding in the training precision is no worse than what
PyTorch's own kernel gives, both measured here against a float64 (norm) or fp32 (network) reference:

- `stats_fused`: InstanceNorm3d as torch.var_mean statistics and one fused multiply-add
  x * (w / std) + (b - mean * w / std) in the input's precision: two kernels instead of PyTorch's
  batch-norm-on-a-reshape, but the multiply-add rounds x * scale before the shift cancels it, so its error
  grows with a channel's mean (on an H200, with another test input: 1.4-1.6x the kernel's in bf16, docs/gpu.md);
- `stats_centred`: the same statistics, then (x - mean) * (w / std) + b computed in fp32 and rounded once:
  the subtraction no longer cancels, but var_mean still returns the mean rounded to the input's precision;
- `stats_fp32`: statistics of an fp32 copy of x, then as `stats_centred`: rounds like PyTorch's kernel
  (statistics accumulated and kept in fp32, the output rounded once), at the price of reading x twice in fp32
  in eager mode (torch.compile fuses it, as it fuses PyTorch's norm already).

Measured on this project's CPU (`norm_rounding`'s defaults), the max error as a multiple of PyTorch's kernel's, for
channels of standard deviation 1 and mean 0-64 / of standard deviation 300: fp16: stats_fused 2.1-18x / 3,900x
(var_mean's fp16 variance overflows to inf), stats_centred 1.3-4.8x / 3,900x, stats_fp32 1.0x / 1.0x; bf16:
1.4-14x / 2.2x, 1.2-1.5x / 1.5x, 1.0x / 1.0x. Their speed can only be measured on the GPU.

The GPU check's `candidates` section (gpu_sections.py) runs `measure` on the Task03 plan; its CPU dry run
is in tests/test_gpu_check.py. The kit's network never uses these classes unless one is adopted.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core.device import autocast, autocast_dtype, resolve_device
from ..nn.losses import head_weights
from ..nn.model import build_model
from ..nn.step import train_step
from .pipeline import synthetic_arrays
from .timing import synced_times

NORMS = ("stats_fused", "stats_centred", "stats_fp32")
# the norm's input per channel: (mean, standard deviation). A mean far from 0 is where a multiply-add rounds
# x * scale before the shift cancels it; a spread of 300 is where fp16's variance (90,000) passes its largest value
SPREADS = ((0.0, 1.0), (4.0, 1.0), (16.0, 1.0), (64.0, 1.0), (0.0, 300.0))


class StatsNorm(nn.Module):
    """InstanceNorm3d(affine) from torch.var_mean statistics, as the candidate `kind` (one of NORMS) computes it."""

    def __init__(self, norm: nn.InstanceNorm3d, kind: str):
        super().__init__()
        self.weight, self.bias, self.eps, self.kind = norm.weight, norm.bias, norm.eps, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each (sample, channel) over its voxels, then the affine."""
        xf = None if self.kind == "stats_fused" else x.float()  # one fp32 copy, for the centred arithmetic
        var, mean = torch.var_mean(xf if self.kind == "stats_fp32" else x, dim=(2, 3, 4), correction=0, keepdim=True)
        shape = (1, -1, 1, 1, 1)
        scale = self.weight.float().view(shape) * torch.rsqrt(var.float() + self.eps)
        if xf is None:
            shift = self.bias.float().view(shape) - mean.float() * scale
            return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))
        return torch.addcmul(self.bias.float().view(shape), xf - mean.float(), scale).to(x.dtype)


def with_norm(net: nn.Module, kind: str) -> nn.Module:
    """A copy of `net` (same weights) whose InstanceNorm3d modules are the candidate `kind` ("instance": none)."""
    if kind not in ("instance", *NORMS):
        raise ValueError(f"norm candidate {kind!r}: use instance or one of {NORMS}")
    out = copy.deepcopy(net)
    if kind == "instance":
        return out
    for parent in list(out.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.InstanceNorm3d):
                setattr(parent, name, StatsNorm(child, kind))
    return out


def ratio(err: float, base: float) -> float | None:
    """err as a multiple of base (None where base is exactly 0: the same arithmetic as the reference)."""
    return round(err / base, 3) if base > 0 else None


def norm_rounding(dev: torch.device, dtype: torch.dtype | None, channels: int = 32, size: int = 32,
                  spreads=SPREADS, seed: int = 0) -> dict:
    """Max and mean |error| against a float64 reference of PyTorch's InstanceNorm3d and of each candidate, all
    given the same input rounded to `dtype` and run under its autocast, per (mean, standard deviation) of the
    channels; each candidate's max as a multiple of PyTorch's."""
    g = torch.Generator().manual_seed(seed)
    norm = nn.InstanceNorm3d(channels, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(channels, generator=g))
        norm.bias.copy_(0.5 * torch.randn(channels, generator=g))
    mods = {k: with_norm(nn.Sequential(norm), k).to(dev) for k in ("instance", *NORMS)}
    w, b = norm.weight.detach().double(), norm.bias.detach().double()
    out: dict = {}
    for mean, sd in spreads:
        x = (torch.randn(2, channels, size, size, size, generator=g) * sd + mean).to(dtype or torch.float32)
        ref = F.instance_norm(x.double(), weight=w, bias=b, eps=norm.eps)
        row = {}
        with torch.no_grad(), autocast(dev, dtype):
            for k, m in mods.items():
                err = (m(x.to(dev)).double().cpu() - ref).abs()
                row[k] = {"max_abs": float(err.max()), "mean_abs": float(err.mean())}
        for k in NORMS:
            row[k]["max_ratio_to_instance"] = ratio(row[k]["max_abs"], row["instance"]["max_abs"])
        out[f"mean_{mean:g}_sd_{sd:g}"] = row
    return out


def ct_tiles(plans: dict, n: int, dev: torch.device) -> torch.Tensor:
    """n CT-like tiles of the plan's patch (the data pipeline's synthetic cases, z-scored as the plan does)."""
    patch = [int(p) for p in plans["patch_size"]]
    tiles = [torch.from_numpy(synthetic_arrays(k, patch, torch.device("cpu"))[0].astype(np.float32)) for k in range(n)]
    return torch.stack(tiles)[:, None].to(dev)


def network_rounding(nets: dict, x: torch.Tensor, dtype: torch.dtype | None) -> dict:
    """Each network's logits (deepest head) under autocast `dtype` against the first network's in fp32 (TF32 off):
    max and mean |difference|, argmax agreement, and the max as a multiple of the first network's own."""
    dev = x.device
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            ref = next(iter(nets.values()))(x, mode="deepest").float()
            out = {}
            for k, net in nets.items():
                with autocast(dev, dtype):
                    y = net(x, mode="deepest").float()
                d = (y - ref).abs()
                out[k] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                          "argmax_agreement": float((y.argmax(1) == ref.argmax(1)).float().mean())}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    base = next(iter(out.values()))["max_abs"]
    for r in out.values():
        r["max_ratio_to_instance"] = ratio(r["max_abs"], base)
    return out


def speed(net: nn.Module, plans: dict, x: torch.Tensor, dtype: torch.dtype | None, warmup: int, steps: int) -> dict:
    """Eager tile forward (the tiles of x, deepest head, no grad) and training step (the plan's batch of those
    tiles, every head, SGD as the kit's) of a copy of `net` in `dtype`: median seconds, samples/s, peak memory."""
    dev, net = x.device, copy.deepcopy(net)

    def forward():
        with torch.no_grad(), autocast(dev, dtype):
            net(x, mode="deepest")

    fwd = synced_times(forward, dev, warmup + steps)[warmup:]
    B = int(plans["batch_size"])
    img = x.repeat(-(-B // x.shape[0]), 1, 1, 1, 1)[:B]
    lab = torch.randint(0, plans["num_classes"], (B, *x.shape[2:]), device=dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    weights = head_weights(net.cfg.depth)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    step = synced_times(lambda: train_step(net, opt, scaler, img, lab, weights, 12.0, dtype), dev, warmup + steps)[warmup:]
    return {"tile_forward_s": round(float(np.median(fwd)), 5), "tiles": int(x.shape[0]),
            "step_s": round(float(np.median(step)), 5), "samples_per_s": round(B / float(np.median(step)), 3),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None}


def measure(rec: dict, plans: dict, device: str, precision: str, kinds, tiles: int, warmup: int, steps: int,
            deadline: float, say=print, save=lambda: None) -> None:
    """Into `rec` as it goes (figures measured before a failure stay): the norm rounding, the network rounding and
    the speed of PyTorch's InstanceNorm3d and each candidate in `kinds` on the plan's network. PyTorch's is timed
    first and again last (its faster figure counts); a candidate that would not fit before `deadline`, or fails
    (out of memory), is recorded as skipped."""
    unknown = [k for k in kinds if k not in NORMS]
    if unknown:
        raise ValueError(f"candidates {unknown}: use some of {NORMS}")
    dev = resolve_device(device)
    dtype = autocast_dtype(precision, dev)
    torch.manual_seed(0)
    base = build_model(plans).to(dev)
    nets = {k: with_norm(base, k) for k in ("instance", *kinds)}
    rec.update(precision=str(dtype or "fp32"), candidates=list(kinds), norm_rounding=norm_rounding(dev, dtype))
    x = ct_tiles(plans, tiles, dev)
    rec["network_rounding"] = network_rounding(nets, x, dtype)
    save()
    say("   rounding (max |logit error| vs fp32, x PyTorch's): "
        + ", ".join(f"{k} {r['max_ratio_to_instance']}" for k, r in rec["network_rounding"].items()))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows, last = rec.setdefault("speed", {}), 0.0
    for k in ["instance", *kinds, "instance"]:
        if time.monotonic() + 1.2 * last > deadline:
            rows.setdefault(k, {"skipped": f"would not fit: the last run took {last:.0f} s"})
            continue
        t0 = time.monotonic()
        try:
            r = speed(nets[k], plans, x, dtype, warmup, steps)
        except RuntimeError as e:  # out of memory, an unsupported kernel: the others may still run
            r = {"skipped": f"{type(e).__name__}: {str(e)[:300]}"}
        last = time.monotonic() - t0
        if k in rows and "step_s" in rows[k] and "step_s" in r:  # PyTorch's again: keep the faster
            r = min(rows[k], r, key=lambda v: v["step_s"])
        rows[k] = r
        say(f"   {k}: {r.get('samples_per_s')} samples/s, tile forward {r.get('tile_forward_s')} s {r.get('skipped', '')}")
        save()
    ref = rows.get("instance", {})
    for k in kinds:
        r = rows.get(k, {})
        if "step_s" in r and "step_s" in ref:
            r["step_speedup"] = round(ref["step_s"] / r["step_s"], 3)
            r["tile_speedup"] = round(ref["tile_forward_s"] / r["tile_forward_s"], 3)
            worst = worst_norm_ratio(rec, k)
            # a training step >= 5 % faster and the norm's rounding within 1.1x of PyTorch's at every spread (the
            # network's logits are reported, not judged: on an untrained network their max error is noisy)
            r["adoptable"] = bool(r["step_speedup"] >= 1.05 and worst is not None and worst <= 1.1)
    save()


def worst_norm_ratio(rec: dict, kind: str) -> float | None:
    """The candidate's largest norm-rounding ratio over the spreads (None for PyTorch's own, or where one is not
    defined: fp32)."""
    ratios = [v[kind].get("max_ratio_to_instance") for v in rec.get("norm_rounding", {}).values() if kind in v]
    return None if not ratios or None in ratios else max(ratios)
