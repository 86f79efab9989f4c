"""Checkpoints: weights and training state in `.pt` (loaded with weights_only=True), metadata in a JSON sidecar."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .io import atomic_path, read_json, write_json

KINDS = ("latest", "best", "final")


def checkpoint_path(fold_dir: str | Path, kind: str) -> Path:
    """`fold_dir/checkpoint_<kind>.pt`."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint {kind!r}: use one of {KINDS}")
    return Path(fold_dir) / f"checkpoint_{kind}.pt"


def save(fold_dir: str | Path, kind: str, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write the `.pt` then its JSON sidecar, each atomically; the sidecar marks the pair complete."""
    path = checkpoint_path(fold_dir, kind)
    path.with_suffix(".json").unlink(missing_ok=True)  # a kill before the new sidecar leaves no mismatched pair
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_json(path.with_suffix(".json"), {**meta, "kind": kind, "file": path.name,
                                           "saved": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return path


def load(fold_dir: str | Path, kind: str, map_location="cpu") -> tuple[dict, dict]:
    """(state, sidecar) of a checkpoint; the weights file is read with weights_only=True (no pickle code)."""
    path = checkpoint_path(fold_dir, kind)
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        raise FileNotFoundError(f"no complete {kind} checkpoint in {fold_dir} ({path.name} + {sidecar.name}); "
                                f"train first, or set continue_training: false")
    return torch.load(path, map_location=map_location, weights_only=True), read_json(sidecar)
