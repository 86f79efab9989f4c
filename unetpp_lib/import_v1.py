"""Bring a model trained with the nnU-Net v1 UNet++ fork into the kit.

`python -m unetpp_lib.import_v1 V1_FOLD_DIR FOLD_DIR` turns a fork fold folder
(`model_final_checkpoint.model` + `.model.pkl`, plans in the `.pkl` or `plans.pkl`) into a kit fold folder
(`plans.json`, `checkpoint_final.pt` + `.json`) that `predict` and 05_validate use as a trained one.
The files are read safely by nn/v1_pickle.py (an allow-list unpickler for the `.pkl` files,
torch.load(weights_only=True) for the checkpoint); the weights are renamed by nn/fork_names.py;
v1's plans become the kit's plans.json here.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .nn import checkpoint
from .core.io import write_json
from .core.layout import FoldLayout
from .nn.fork_names import fork_to_kit
from .nn.model import UNetPlusPlus, config_from_plans
from .nn.v1_pickle import ImportV1Error, load_v1_checkpoint, restricted_load
from .plan import GB_PER_UNIT, REF_GB, activation_units
from .prep.resample import ANISO_THRESHOLD
from .prep.transforms import plans_hash


# ----------------------------------------------------------------------------- v1's plans -> the kit's plans.json
def _plain(x: Any) -> Any:
    """numpy values, tuples and OrderedDicts as JSON values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _ints(x) -> list:
    """A (nested) list of ints from arrays, tuples or numpy integers."""
    return [_ints(v) if isinstance(v, (list, tuple, np.ndarray)) else int(v) for v in x]


def _channel0(d: Any, key: str, source: str) -> Any:
    """Entry 0 (the CT channel) of a per-modality dict of v1's plans."""
    if not isinstance(d, dict) or 0 not in d:
        raise ImportV1Error(f"{source}: plans[{key!r}] has no entry for channel 0; not a v1 plans file")
    return d[0]


def select_stage(plans: dict, stage: Any, source: str) -> tuple[int, str]:
    """(stage, configuration) the trainer used: its `stage` init argument, or the only stage of the plans."""
    stages = plans["plans_per_stage"]
    if stage is None:
        if len(stages) != 1:
            raise ImportV1Error(f"{source}: the trainer named no stage and the plans have {len(stages)}; "
                                f"not a checkpoint v1 can restore either")
        stage = next(iter(stages))
    if stage not in stages:
        raise ImportV1Error(f"{source}: stage {stage} is not in the plans (stages {sorted(stages)}); the .pkl and "
                            f"plans belong to different runs: copy the fold folder again")
    return int(stage), "3d_fullres" if stage == max(stages) else "3d_lowres"


def kit_plans(plans: dict, stage: int, source: str) -> dict:
    """The kit's plans.json for stage `stage` of v1 plans (the values plan.plan_3d writes, from v1's ones)."""
    s = plans["plans_per_stage"][stage]
    patch = _ints(s["patch_size"])
    if len(patch) != 3:
        raise ImportV1Error(f"{source}: a {len(patch)}D model (patch {patch}); the kit runs 3D models only: import "
                            f"the fork's 3d_fullres (or 3d_lowres) fold")
    if "pool_op_kernel_sizes" not in s or "conv_kernel_sizes" not in s:
        raise ImportV1Error(f"{source}: plans without pool_op_kernel_sizes / conv_kernel_sizes (nnU-Net before "
                            f"v1's 2019 plans); plan and preprocess again with nnU-Net v1, or retrain with the kit")
    if plans.get("num_modalities", 1) != 1:
        raise ImportV1Error(f"{source}: {plans['num_modalities']} input channels; the kit segments one CT channel")
    scheme = _channel0(plans["normalization_schemes"], "normalization_schemes", source)
    if scheme != "CT":
        raise ImportV1Error(f"{source}: normalisation {scheme!r}; the kit implements v1's 'CT' scheme only "
                            f"(clip to the foreground percentiles, z-score with the foreground mean and sd): this "
                            f"model cannot be imported")
    if _channel0(plans.get("use_mask_for_norm") or {0: False}, "use_mask_for_norm", source):
        raise ImportV1Error(f"{source}: normalisation inside the nonzero mask; the kit's CT scheme normalises "
                            f"every voxel, as v1 does for CT")
    if plans.get("preprocessor_name", "GenericPreprocessor") != "GenericPreprocessor":
        raise ImportV1Error(f"{source}: preprocessor {plans['preprocessor_name']}; the kit resamples as v1's "
                            f"GenericPreprocessor only")
    # plans older than v1's transposes have none: v1 then assumes the identity, as here
    forward = _ints([0, 1, 2] if plans.get("transpose_forward") is None else plans["transpose_forward"])
    backward = _ints([0, 1, 2] if plans.get("transpose_backward") is None else plans["transpose_backward"])
    if sorted(forward) != [0, 1, 2] or backward != np.argsort(forward).tolist():
        raise ImportV1Error(f"{source}: transpose_forward {forward} and transpose_backward {backward} do not "
                            f"undo each other; the plans are damaged")
    ip = _channel0(plans["dataset_properties"]["intensityproperties"], "intensityproperties", source)
    pools, convs = _ints(s["pool_op_kernel_sizes"]), _ints(s["conv_kernel_sizes"])
    base, n_in, n_cls = int(plans["base_num_features"]), 1, int(plans["num_classes"]) + 1  # v1 counts no background
    units = activation_units(patch, pools, base, 320, n_in, n_cls, "unet")
    out = {
        "planner": "nnunet_v1", "axes": "raw (z, y, x) permuted by transpose_forward, coarsest axis first",
        "transpose_forward": forward, "target_spacing": [float(v) for v in s["current_spacing"]],
        "median_shape": _ints(s["median_patient_size_in_voxels"]), "patch_size": patch,
        "batch_size": int(s["batch_size"]), "num_pool_per_axis": _ints(s["num_pool_per_axis"]),
        "pool_op_kernel_sizes": pools, "conv_kernel_sizes": convs, "base_num_features": base,
        "max_num_features": 320,  # v1's 3D cap (Generic_UNet.MAX_NUM_FILTERS_3D), which the fork's trainer keeps
        "conv_per_stage": int(plans.get("conv_per_stage", 2)), "num_input_channels": n_in, "num_classes": n_cls,
        "do_dummy_2D_data_aug": bool(s["do_dummy_2D_data_aug"]),
        "memory": {"units_per_sample": units, "arch": "unet", "device_memory_gb": REF_GB,
                   "estimated_gb_per_sample": round(units * GB_PER_UNIT, 2)},
        # v1's CT scheme: clip to the foreground 0.5 / 99.5 percentiles, then (x - mean) / sd of the foreground
        "normalization": {"scheme": "CT", "clip": [float(ip["percentile_00_5"]), float(ip["percentile_99_5"])],
                          "mean": float(ip["mean"]), "std": float(ip["sd"])},
        # GenericPreprocessor: cubic image, linear labels, nearest along a coarse axis past the anisotropy threshold
        "resampling": {"image_order": 3, "label_order": 1, "coarse_axis_order": 0, "aniso_threshold": ANISO_THRESHOLD},
    }
    out["preprocessing_hash"] = plans_hash(out)
    return out


# ----------------------------------------------------------------------------- a fork fold folder
V1_CHECKPOINTS = ("model_final_checkpoint", "model_best", "model_latest")


@dataclass
class V1Fold:
    """What the importer read from a fork fold folder."""

    checkpoint: Path
    info: dict  # the .model.pkl: init, name, class, plans
    plans: dict
    plans_source: Path
    state: dict  # the fork's state dict
    epoch: int


def _find_plans(info: dict, fold: Path, pkl: Path) -> tuple[dict, Path]:
    """The plans v1 restores the trainer with: the .pkl's own, else plans.pkl in the fold or beside it."""
    if isinstance(info.get("plans"), dict):
        return info["plans"], pkl
    for p in (fold / "plans.pkl", fold.parent / "plans.pkl"):
        if p.is_file():
            plans = restricted_load(p)
            if isinstance(plans, dict):
                return plans, p
    raise ImportV1Error(f"{pkl}: holds no plans, and neither {fold / 'plans.pkl'} nor {fold.parent / 'plans.pkl'} "
                        f"exists; copy plans.pkl of the trainer folder (beside fold_<k>/) into {fold}")


def read_v1_fold(folder: str | Path, name: str = "model_final_checkpoint") -> V1Fold:
    """The checkpoint, its .pkl and the plans of a fork fold folder, each checked."""
    fold = Path(folder)
    if not fold.is_dir():
        raise ImportV1Error(f"{fold}: folder not found; pass the fork's fold folder (.../nnUNetPlusPlusTrainerV2__"
                            f"nnUNetPlansv2.1/fold_<k>)")
    ckpt_path, pkl = fold / f"{name}.model", fold / f"{name}.model.pkl"
    if not ckpt_path.is_file():
        have = sorted(p.name for p in fold.glob("*.model"))
        fix = f"pass --checkpoint {have[0][:-6]}" if have else "copy the fold folder with its .model files"
        raise ImportV1Error(f"{ckpt_path}: missing ({'found ' + ', '.join(have) if have else 'no .model file'}); {fix}")
    if not pkl.is_file():
        raise ImportV1Error(f"{pkl}: missing; v1 writes it beside every checkpoint (trainer, stage and plans): copy it "
                            f"from the machine that trained the model")
    info = restricted_load(pkl)
    if not isinstance(info, dict) or "init" not in info or "name" not in info:
        raise ImportV1Error(f"{pkl}: not a v1 checkpoint .pkl (no init / name); copy the file again")
    trainer = str(info["name"])
    if "cascade" in trainer.lower():
        raise ImportV1Error(f"{pkl}: trainer {trainer} is a 3d_cascade_fullres model, which takes the 3d_lowres "
                            f"segmentation as extra input; the kit has no cascade: import the fork's 3d_fullres fold")
    plans, plans_source = _find_plans(info, fold, pkl)
    ckpt = load_v1_checkpoint(ckpt_path)
    # v1 strips the prefix of a state dict saved from nn.DataParallel the same way
    state = {k[7:] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
    return V1Fold(ckpt_path, info, plans, plans_source, state, int(ckpt.get("epoch", 0)))


def fork_weights(v1: V1Fold, plans: dict) -> dict:
    """The fork's weights under the kit's names, loaded strictly into the kit's network of these plans."""
    cfg = config_from_plans(plans)
    first = v1.state.get("conv_blocks_context.0.blocks.0.conv.weight")
    if first is not None and first.shape[1] != cfg.in_channels:
        raise ImportV1Error(f"{v1.checkpoint}: the network takes {first.shape[1]} input channels, the plans "
                            f"{cfg.in_channels}; a cascade stage or another task's plans: import a 3d_fullres fold "
                            f"with its own .pkl")
    try:
        mapped = fork_to_kit(v1.state, cfg)
    except ValueError as e:  # its message names the first unknown weights and asks the question
        raise ImportV1Error(f"{v1.checkpoint}: {e}") from None
    net = UNetPlusPlus(cfg)
    try:
        net.load_state_dict(mapped)
    except RuntimeError as e:  # missing weights or other shapes: another width, depth or trainer
        lines = str(e).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip().rstrip(".")  # the first mismatch
        raise ImportV1Error(f"{v1.checkpoint}: its weights do not fit the fork's UNet++ of the plans in "
                            f"{v1.plans_source.name} ({detail[:300]}); were the .model and .pkl copied from "
                            f"different runs, or is it another network?") from None
    return net.state_dict()


def _existing(fold: FoldLayout) -> list[Path]:
    """Kit files in the target folder that an import would replace."""
    return [p for p in [fold.plans, *fold.all_checkpoints()] if p.exists()]


def import_fold(v1_dir: str | Path, fold_dir: str | Path, name: str = "model_final_checkpoint",
                overwrite: bool = False) -> dict:
    """Write `fold_dir` as a kit fold folder (plans.json, final checkpoint) from a fork fold folder; returns
    the checkpoint's sidecar. Everything is read and checked before anything is written."""
    v1 = read_v1_fold(v1_dir, name)
    init = list(v1.info["init"]) if isinstance(v1.info["init"], (list, tuple)) else []
    try:
        stage, configuration = select_stage(v1.plans, init[5] if len(init) > 5 else None, str(v1.plans_source))
        plans = kit_plans(v1.plans, stage, str(v1.plans_source))
    except (KeyError, TypeError, IndexError) as e:
        raise ImportV1Error(f"{v1.plans_source}: not v1 plans ({type(e).__name__}: {e} missing or malformed); copy "
                            f"the fold's .pkl and plans.pkl again") from None
    weights = fork_weights(v1, plans)
    fold = FoldLayout(fold_dir)
    there = _existing(fold)
    if there and not overwrite:
        raise ImportV1Error(f"{fold.root}: already holds {', '.join(p.name for p in there)}; choose an empty folder, "
                            f"or pass --overwrite to replace them")
    # sidecars first: a kill in between never leaves an old sidecar marking other weights complete
    for p in sorted(fold.all_checkpoints(), key=lambda p: p.suffix != ".json"):
        p.unlink(missing_ok=True)
    write_json(fold.plans, plans)
    meta = {"epoch": v1.epoch, "fold": _plain(init[1]) if len(init) > 1 else None,
            "plans_hash": plans["preprocessing_hash"], "network": asdict(config_from_plans(plans)), "metrics": {},
            "world_size": 1,
            "imported_from": {"path": str(Path(v1_dir).resolve()), "checkpoint": v1.checkpoint.name,
                              "plans": str(v1.plans_source.resolve()), "trainer": str(v1.info["name"]),
                              "trainer_class": str(v1.info.get("class", "")), "v1_epoch": v1.epoch,
                              "stage": stage, "configuration": configuration}}
    checkpoint.save(fold.root, "final", {"model": weights, "epoch": v1.epoch}, meta)
    return {**meta, "kind": "final"}


# ----------------------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    ap = argparse.ArgumentParser(prog="python -m unetpp_lib.import_v1",
                                 description="Turn a fold folder of the nnU-Net v1 UNet++ fork (MrGiovanni/UNetPlusPlus:"
                                             " <checkpoint>.model + .model.pkl, plans.pkl) into a kit fold folder that "
                                             "`python -m unetpp_lib.predict -m FOLD_DIR` and 05_validate use.")
    ap.add_argument("v1_fold", type=Path, metavar="V1_FOLD_DIR", help="the fork's fold_<k> folder")
    ap.add_argument("fold_dir", type=Path, metavar="FOLD_DIR", help="the kit fold folder to write")
    ap.add_argument("--checkpoint", default="model_final_checkpoint", choices=V1_CHECKPOINTS,
                    help="which v1 checkpoint to import (default: model_final_checkpoint); written as the kit's final")
    ap.add_argument("--overwrite", action="store_true", help="replace the plans and checkpoints already in FOLD_DIR")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Import; exit status 0, or 2 with one line on stderr naming the file and the fix."""
    args = build_parser().parse_args(argv)
    try:
        meta = import_fold(args.v1_fold, args.fold_dir, args.checkpoint, args.overwrite)
    except ImportV1Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = meta["imported_from"]
    print(f"imported {src['trainer']} ({src['configuration']}, stage {src['stage']}), epoch {meta['epoch']}, from "
          f"{src['path']} -> {args.fold_dir}: plans.json, checkpoint_final.pt + .json\n"
          f"predict with: python -m unetpp_lib.predict -i IMAGES_DIR -o OUT_DIR -m {args.fold_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
