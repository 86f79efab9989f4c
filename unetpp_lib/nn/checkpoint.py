"""Checkpoints: weights and training state in `.pt` (loaded with weights_only=True), metadata in a JSON sidecar,
and the one check that a checkpoint was trained for the plans beside it (`check_plans`).

Each file is written under a temporary name and renamed, the sidecar last (it marks the pair complete). Before a
new `latest` replaces the old one, the old pair is kept as `previous` (hard links, a copy where the file system has
none), so a `latest` damaged later (a crash while it was copied, a bad disk) is never the only copy: training falls
back to `previous` with a warning. A damaged file is named in one error with the fix.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..core.io import atomic_path, read_json, write_json
from ..core.layout import CHECKPOINT_KINDS, FoldLayout, RunLayout


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint)."""


def _keep_as_previous(fold: FoldLayout) -> None:
    """Link (or copy) the complete `latest` pair to `previous`, weights first, sidecar last."""
    old, old_meta = fold.checkpoint("latest"), fold.sidecar("latest")
    if not (old.is_file() and old_meta.is_file()):
        return
    prev, prev_meta = fold.checkpoint("previous"), fold.sidecar("previous")
    prev_meta.unlink(missing_ok=True)  # incomplete until its sidecar is back
    for src, dst in ((old, prev), (old_meta, prev_meta)):
        with atomic_path(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:  # no hard links on this file system
                shutil.copyfile(src, tmp)


def save(model_dir: str | Path, kind: str, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write the `.pt` then its JSON sidecar, each atomically; the sidecar marks the pair complete. A new `latest`
    keeps the one it replaces as `previous`."""
    fold = FoldLayout(model_dir)
    path, sidecar = fold.checkpoint(kind), fold.sidecar(kind)
    if kind == "latest":
        _keep_as_previous(fold)
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
    fix = (f"fix: copy the fold folder again from where it was trained, or delete {path.name} and {sidecar.name} "
           f"(training then continues from the checkpoint before it, or starts the fold over)")
    try:
        meta = read_json(sidecar)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"{sidecar}: damaged checkpoint sidecar ({e}); {fix}") from e
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle stream, CRC error: torch raises several kinds
        raise DamagedCheckpoint(f"{path}: damaged checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                f"{fix}") from e
    if not isinstance(state, dict) or ("epoch" in meta and "epoch" in state and int(state["epoch"]) != meta["epoch"]):
        raise DamagedCheckpoint(f"{path}: its weights do not belong to {sidecar.name} (epoch "
                                f"{state.get('epoch') if isinstance(state, dict) else '?'} vs {meta.get('epoch')}); "
                                f"{fix}")
    return state, meta


def load_latest(model_dir: str | Path, map_location="cpu") -> tuple[dict, dict, str]:
    """(state, sidecar, warning) of the latest checkpoint, or of the one before it when the latest is damaged or
    incomplete (the warning then says so; empty otherwise)."""
    try:
        return (*load(model_dir, "latest", map_location), "")
    except (DamagedCheckpoint, FileNotFoundError) as e:
        fold = FoldLayout(model_dir)
        if not fold.sidecar("previous").is_file():
            raise
        state, meta = load(model_dir, "previous", map_location)
        return state, meta, (f"warning: {e}\nwarning: continuing from the checkpoint before it "
                             f"({fold.checkpoint('previous').name}, epoch {meta['epoch']})")


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
