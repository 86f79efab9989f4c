"""Checkpoints: weights and training state in `.pt` (loaded with weights_only=True), metadata in a JSON sidecar,
and the one check that a checkpoint was trained for the plans beside it (`check_plans`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..core.io import atomic_path, read_json, write_json
from ..core.layout import CHECKPOINT_KINDS, FoldLayout, RunLayout


def save(model_dir: str | Path, kind: str, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write the `.pt` then its JSON sidecar, each atomically; the sidecar marks the pair complete."""
    fold = FoldLayout(model_dir)
    path, sidecar = fold.checkpoint(kind), fold.sidecar(kind)
    sidecar.unlink(missing_ok=True)  # a kill before the new sidecar leaves no mismatched pair
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_json(sidecar, {**meta, "kind": kind, "file": path.name, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return path


def load(model_dir: str | Path, kind: str, map_location="cpu") -> tuple[dict, dict]:
    """(state, sidecar) of a checkpoint; the weights file is read with weights_only=True (no pickle code)."""
    fold = FoldLayout(model_dir)
    path, sidecar = fold.checkpoint(kind), fold.sidecar(kind)
    if not (path.is_file() and sidecar.is_file()):
        raise FileNotFoundError(f"no complete {kind} checkpoint in {model_dir} ({path.name} + {sidecar.name}); "
                                f"train first, or set continue_training: false")
    return torch.load(path, map_location=map_location, weights_only=True), read_json(sidecar)


class PlansMismatch(ValueError):
    """A checkpoint trained for other plans than the fold's plans.json."""


def check_plans(model_dir: str | Path, kind: str, meta: dict[str, Any], plans: dict) -> None:
    """Refuse (PlansMismatch) a checkpoint whose sidecar `meta` names other plans than the fold's `plans`."""
    if meta["plans_hash"] != plans["preprocessing_hash"]:
        fold = FoldLayout(model_dir)
        raise PlansMismatch(f"{fold.root}: {kind} checkpoint was trained for plans {meta['plans_hash']}, but "
                            f"{fold.plans} is {plans['preprocessing_hash']}")


def adopt_run_plans(layout: RunLayout, fold: int) -> None:
    """Give a fold trained before folds held their own plans a copy of the run's, if its checkpoints match them."""
    model = layout.fold(fold)
    if model.plans.is_file() or not layout.pre.plans.is_file():
        return
    plans = read_json(layout.pre.plans)
    hashes = {read_json(model.sidecar(k)).get("plans_hash") for k in CHECKPOINT_KINDS if model.sidecar(k).is_file()}
    if hashes == {plans["preprocessing_hash"]}:
        write_json(model.plans, plans)
