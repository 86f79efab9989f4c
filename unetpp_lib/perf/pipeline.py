"""The GPU check's data-pipeline measurements: a scratch store of CT-like cases written as the kit writes its
store, and training steps fed by the real loader and augmentation (how long each step waits for its batch).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import timing
from ..core.device import autocast_dtype, resolve_device, synchronize
from ..core.layout import PreLayout
from ..nn.augment import augment_batch
from ..nn.data import pad_to_background
from ..nn.losses import head_weights
from ..nn.model import build_model
from ..nn.step import train_step
from ..prep.store import sample_locations, stored_bytes, write_case


def synthetic_arrays(k: int, shape, dev: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Case k of the scratch store: a CT-like image (z-scored integer HU, air constant; float16) and labels 0/1/2."""
    g = torch.Generator(dev.type).manual_seed(k)
    coarse = torch.randn(1, 1, *[max(2, s // 24) for s in shape], generator=g, device=dev)
    smooth = F.interpolate(coarse, size=list(shape), mode="trilinear", align_corners=False)[0, 0]
    # ~35 % soft tissue: the rest (air, fat, bone) is clipped to a constant by the CT normalisation
    body = F.interpolate(coarse.abs(), size=list(shape), mode="nearest")[0, 0] < 0.45
    # integer HU as CT stores them, 15 HU noise, clipped and z-scored as the Task03 plan does: compresses like CT
    hu = (100 + 40 * smooth + 15 * torch.randn(list(shape), generator=g, device=dev)).round().clamp(-17, 201)
    img = (torch.where(body, hu, -17.0) - 99.4) / 39.4
    lab = ((smooth > 0.4) & body).to(torch.uint8) + ((smooth > 1.2) & body).to(torch.uint8)
    return img.half().cpu().numpy(), lab.cpu().numpy()


def cases_before(n: int, deadline: float, secs: list[float]) -> Iterator[int]:
    """Case numbers 0..n-1, each one's seconds (the caller's work on it) appended to `secs`; stops before a case
    would likely pass `deadline` (1.5x the slowest so far), and never before the first."""
    for k in range(n):
        if secs and time.monotonic() + 1.5 * max(secs) > deadline:
            return
        t0 = time.monotonic()
        yield k
        secs.append(time.monotonic() - t0)


def synthetic_store(pre: Path, n: int, shape, patch, dev: torch.device, deadline: float) -> dict:
    """n cases of synthetic_arrays written through store.write_case; stops early rather than pass `deadline`."""
    cases, secs, sizes = [], [], []
    for k in cases_before(n, deadline, secs):
        img, lab = synthetic_arrays(k, shape, dev)
        name = f"synth_{k}"
        path = write_case(PreLayout(pre).case_store(name), img, lab, sample_locations(lab, k), patch)
        cases.append(name)
        sizes.append(stored_bytes(path) / img.size)
    return {"cases": cases, "shape": list(shape), "seconds_per_case": [round(v, 2) for v in secs],
            "bytes_per_voxel": round(float(np.mean(sizes)), 4)}


def fed_training(pre: Path, cases: list[str], plans: dict, s: Any, workers: int, deadline: float) -> dict:
    """Training steps fed by the real loader + augmentation: how long each step waits for its batch."""
    dev = resolve_device(s.device)
    it, cfg, _ = timing.training_batches(pre, cases, plans, workers, dev.type == "cuda")
    net = build_model(plans).to(dev).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    dtype, weights = autocast_dtype(s.precisions[0], dev), head_weights(net.cfg.depth)
    scaler, gen = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16), torch.Generator().manual_seed(0)
    parts = {"wait": [], "augment": [], "step": []}
    for i in range(s.fed_steps + 2):  # the first two fill the queue and warm cuDNN up
        if i > 2 and time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        img, lab = next(it)
        t1 = time.perf_counter()
        img, lab = img.to(dev, non_blocking=True).float(), lab.to(dev, non_blocking=True).long()
        img, lab = augment_batch(img, lab, plans["patch_size"], plans["num_classes"], cfg, gen)
        lab, img = pad_to_background(lab), img.contiguous(memory_format=torch.channels_last_3d)
        synchronize(dev)
        t2 = time.perf_counter()
        train_step(net, opt, scaler, img, lab, weights, 12.0, dtype)
        synchronize(dev)
        if i >= 2:
            for k, v in zip(parts, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                parts[k].append(v)
    total = sum(map(sum, parts.values()))
    return {"steps": len(parts["step"]), "precision": str(dtype or "fp32"), "channels_last": True,
            **{f"{k}_s_mean": round(float(np.mean(v)), 4) for k, v in parts.items()},
            "gpu_waits_on_data_fraction": round(sum(parts["wait"]) / total, 4),
            "augment_fraction": round(sum(parts["augment"]) / total, 4),
            "samples_per_s": round(int(plans["batch_size"]) * len(parts["step"]) / total, 3)}
