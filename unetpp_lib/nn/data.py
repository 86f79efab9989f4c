"""Training batches from the preprocessed store: random cases, foreground oversampling, enlarged patches.

Box placement is nnU-Net v1's DataLoader3D rule: the loaded (enlarged) box may stick out of
the image by half the enlargement, so the final, centre-cropped patch stays inside any image
at least patch-sized; outside it the image reads 0 and the label IGNORE, which the trainer
turns into background before the loss (v1's RemoveLabelTransform(-1, 0)).

Loader workers read only the chunks a patch overlaps (store.py) and hand over
float16 image / int16 label tensors; augmentation runs afterwards on the device.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..core.layout import PreLayout
from .losses import IGNORE
from ..prep.store import class_locations, open_case

OVERSAMPLE = 0.33  # share of each (global) batch centred on foreground


def forced_foreground(global_batch: int, fraction: float = OVERSAMPLE) -> list[bool]:
    """Which samples of a global batch are centred on foreground: the last 33 %, at least one when B <= 2.

    v1's get_do_oversample is the same rule (sample i forced when i >= round(B x 0.67)) except at
    B = 1, where it never forces foreground; we do, so that a batch-1 run still sees the tumour.
    """
    n = global_batch - int(round(global_batch * (1 - fraction)))
    if global_batch <= 2:
        n = max(n, 1)
    return [i >= global_batch - n for i in range(global_batch)]


def box_bounds(shape, box, patch) -> tuple[list[int], list[int]]:
    """Lowest and highest lower corner per axis of a `box` whose centre `patch` must stay inside `shape`.

    v1's DataLoader3D: pad = box - patch (or box - shape where the image is smaller than the patch,
    which then sits centred), split with the odd voxel before the image. v1 also keeps that larger pad
    for every later case (it edits its need_to_pad in place); we take each case on its own.
    """
    lo, hi = [], []
    for n, b, p in zip(shape, box, patch):
        half = (max(b - p, b - n) + 1) // 2
        lo.append(-half)
        hi.append(n + half - b)
    return lo, hi


def box_origin(rng: np.random.Generator, shape, box, patch, centre=None) -> list[int]:
    """Lower corner of a box: uniform between box_bounds, or centred on `centre` but clipped at the lower bound only.

    v1 does not clip a foreground box from above, so there the final patch may leave the image.
    """
    lo, hi = box_bounds(shape, box, patch)
    if centre is None:
        return [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
    return [max(a, int(c) - b // 2) for a, c, b in zip(lo, centre, box)]


def read_box(arr, lo, size, fill, dtype) -> np.ndarray:
    """Read the box [lo, lo + size) of a (lazy) array as `dtype`, filling what lies outside with `fill`."""
    shape = arr.shape
    src = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(lo, size, shape))
    out = np.full(tuple(size), fill, dtype=dtype)
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
    if all(s.stop > s.start for s in src):
        out[dst] = arr[src]
    return out


def pad_to_background(lab: torch.Tensor) -> torch.Tensor:
    """Labels from outside the image (IGNORE) become background 0, as v1's RemoveLabelTransform(-1, 0) before the loss."""
    return lab.masked_fill(lab == IGNORE, 0)


class PatchSampler:
    """Draws (image, label) boxes of size `box` from the cases of one split; `patch` is the final (centre) crop."""

    def __init__(self, pre_dir: str | Path, cases: list[str], box, patch=None):
        self.paths = [str(PreLayout(pre_dir).case_store(c)) for c in cases]
        self.box = [int(b) for b in box]
        self.patch = [int(p) for p in (box if patch is None else patch)]
        self._open: dict[int, tuple] = {}

    def _case(self, k: int):
        """Open case k once per process: arrays and its class locations."""
        if k not in self._open:
            g = open_case(self.paths[k])
            self._open[k] = (g["image"], g["label"], class_locations(g))
        return self._open[k]

    def origin(self, rng: np.random.Generator, foreground: bool) -> tuple[int, list[int]]:
        """(case index, box lower corner): centred on a random voxel of a random class present if `foreground`."""
        k = int(rng.integers(len(self.paths)))
        img, _, locs = self._case(k)
        centre = None
        if foreground and locs:  # a case without foreground falls back to a random box, as in v1
            pts = locs[int(rng.choice(sorted(locs)))]
            centre = pts[int(rng.integers(len(pts)))]
        return k, box_origin(rng, img.shape, self.box, self.patch, centre)

    def sample(self, rng: np.random.Generator, foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        """One box from a random case (image float16 padded with 0, label int16 padded with IGNORE)."""
        k, lo = self.origin(rng, foreground)
        img, lab, _ = self._case(k)
        return read_box(img, lo, self.box, 0, np.float16), read_box(lab, lo, self.box, IGNORE, np.int16)

    def batch(self, rng: np.random.Generator, forced: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, *box) float16 image and (B, *box) int16 label."""
        pairs = [self.sample(rng, f) for f in forced]
        img = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
        lab = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return img, lab


class BatchStream(IterableDataset):
    """Endless batches for one rank; each loader worker has its own seeded generator."""

    def __init__(self, sampler: PatchSampler, forced: list[bool], seed: int):
        self.sampler, self.forced, self.seed = sampler, forced, seed

    def __iter__(self):
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            yield self.sampler.batch(rng, self.forced)


def make_loader(sampler: PatchSampler, forced: list[bool], seed: int, num_workers: int, pin: bool):
    """A DataLoader over BatchStream (batches are built whole, in workers when num_workers > 0)."""
    kwargs = {"prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(BatchStream(sampler, forced, seed), batch_size=None, num_workers=num_workers,
                      pin_memory=pin, **kwargs)


def rank_slice(global_batch: int, rank: int, world: int) -> slice:
    """This rank's share of the global batch."""
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {world} processes: "
                         f"use a multiple of {world} (plan_overrides: {{batch_size: {math.ceil(global_batch / world) * world}}})")
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)
