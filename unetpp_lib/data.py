"""Training batches from the preprocessed store: random cases, foreground oversampling, enlarged patches.

Loader workers read only the chunks a patch overlaps (store.py) and hand over
float16 image / int16 label tensors; augmentation runs afterwards on the device.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .losses import IGNORE
from .preprocess import STAGE
from .store import class_locations, open_case

OVERSAMPLE = 0.33  # share of each (global) batch centred on foreground


def forced_foreground(global_batch: int, fraction: float = OVERSAMPLE) -> list[bool]:
    """Which samples of a global batch are centred on foreground: the last 33 %, at least one when B <= 2."""
    n = global_batch - int(round(global_batch * (1 - fraction)))
    if global_batch <= 2:
        n = max(n, 1)
    return [i >= global_batch - n for i in range(global_batch)]


def read_box(arr, lo, size, fill, dtype) -> np.ndarray:
    """Read the box [lo, lo + size) of a (lazy) array as `dtype`, filling what lies outside with `fill`."""
    shape = arr.shape
    src = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(lo, size, shape))
    out = np.full(tuple(size), fill, dtype=dtype)
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
    if all(s.stop > s.start for s in src):
        out[dst] = arr[src]
    return out


class PatchSampler:
    """Draws (image, label) boxes of size `box` from the cases of one split."""

    def __init__(self, pre_dir: str | Path, cases: list[str], box):
        self.paths = [str(Path(pre_dir) / STAGE / f"{c}.zarr") for c in cases]
        self.box = [int(b) for b in box]
        self._open: dict[int, tuple] = {}

    def _case(self, k: int):
        """Open case k once per process: arrays and its class locations."""
        if k not in self._open:
            g = open_case(self.paths[k])
            self._open[k] = (g["image"], g["label"], class_locations(g))
        return self._open[k]

    def sample(self, rng: np.random.Generator, foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        """One box from a random case; centred on a random voxel of a random class present if `foreground`."""
        img, lab, locs = self._case(int(rng.integers(len(self.paths))))
        shape = img.shape
        if foreground and locs:
            pts = locs[int(rng.choice(sorted(locs)))]
            centre = pts[int(rng.integers(len(pts)))]
        else:  # centre anywhere in the case; the box may reach beyond it (padding, label ignored)
            centre = [int(rng.integers(0, n)) for n in shape]
        lo = [int(c) - b // 2 for c, b in zip(centre, self.box)]
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
