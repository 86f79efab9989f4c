"""Bring a model trained with the nnU-Net v1 UNet++ fork into the kit.

The fork (MrGiovanni/UNetPlusPlus, `Generic_UNetPlusPlus`) names its modules by pathway:
`conv_blocks_context[d]` is the encoder node X(d, 0) (the bottleneck X(L, 0) as two stacks of
convs - 1 and one conv), `loc{z}[n]` the decoder node X(L-1-z-n, n+1) on the anti-diagonal
i + j = L - z (again two stacks), `up{z}[n]` its transposed conv from X(i+1, j-1), and
`seg_outputs[m]` the head on X(0, L - m). `fork_to_kit` renames a fork state dict to
`model.UNetPlusPlus`'s names; nothing else differs (same convs, norms and shapes).

`python -m unetpp_lib.import_v1 V1_FOLD_DIR FOLD_DIR` turns a fork fold folder
(`model_final_checkpoint.model` + `.model.pkl`, plans in the `.pkl` or `plans.pkl`) into a kit fold folder
(`plans.json`, `checkpoint_final.pt` + `.json`) that `predict` and 05_validate use as a trained one.
The `.pkl` files go through `restricted_load`, which builds numpy arrays and scalars, OrderedDicts and
plain Python values only and refuses any other class or function before anything is built; the
checkpoint through torch.load(weights_only=True) with numpy's scalar and array reconstructors allowed.
"""
from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .nn import checkpoint
from .core.io import write_json
from .core.layout import FoldLayout
from .nn.model import UNetPlusPlus, UNetPPConfig, config_from_plans
from .plan import GB_PER_UNIT, REF_GB, activation_units
from .prep.resample import ANISO_THRESHOLD
from .prep.transforms import plans_hash


def _blocks(prefix: str, convs: int, split: bool) -> list[str]:
    """The fork's prefixes of a node's conv blocks, in order (one stack, or two when `split`)."""
    if not split:
        return [f"{prefix}.blocks.{b}" for b in range(convs)]
    return [f"{prefix}.0.blocks.{b}" for b in range(convs - 1)] + [f"{prefix}.1.blocks.0"]


def fork_names(cfg: UNetPPConfig) -> dict[str, str]:
    """Fork parameter-name prefix -> kit prefix, for every conv block, transposed conv and head."""
    L, n = cfg.depth, cfg.conv_per_stage
    names: dict[str, str] = {}
    for d in range(L + 1):
        for b, fork in enumerate(_blocks(f"conv_blocks_context.{d}", n, split=d == L)):
            names[fork] = f"nodes.x_{d}_0.{b}"
    for z in range(L):
        for k in range(L - z):
            i, j = L - 1 - z - k, k + 1
            for b, fork in enumerate(_blocks(f"loc{z}.{k}", n, split=True)):
                names[fork] = f"nodes.x_{i}_{j}.{b}"
            names[f"up{z}.{k}"] = f"ups.up_{i + 1}_{j - 1}"
        names[f"seg_outputs.{z}"] = f"heads.{L - 1 - z}"
    return names


_LEAF = {"conv.weight": "0.weight", "conv.bias": "0.bias", "instnorm.weight": "1.weight", "instnorm.bias": "1.bias"}


def fork_to_kit(state: dict, cfg: UNetPPConfig) -> dict:
    """The fork's state dict under the kit's names; refuses keys it does not know and reports missing ones."""
    prefixes = fork_names(cfg)
    out, unknown = {}, []
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # instance norm without running statistics: the fork never fills them
        m = re.match(r"(.*?)\.(conv\.weight|conv\.bias|instnorm\.weight|instnorm\.bias)$", key)
        if m and m.group(1) in prefixes:
            out[f"{prefixes[m.group(1)]}.{_LEAF[m.group(2)]}"] = value
        elif key.endswith(".weight") and key[:-7] in prefixes:
            out[f"{prefixes[key[:-7]]}.weight"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} weights the fork's UNet++ of depth {cfg.depth} does not have "
                         f"(first: {unknown[:3]}); is this checkpoint from another network (a plain U-Net, "
                         f"another depth)?")
    return out


def kit_to_fork(state: dict, cfg: UNetPPConfig) -> dict:
    """The inverse renaming: kit names -> the fork's names (for comparing gradients and writing fork checkpoints)."""
    back = {}
    for fork, kit in fork_names(cfg).items():
        if kit.startswith(("ups.", "heads.")):
            back[f"{kit}.weight"] = f"{fork}.weight"
        else:
            for leaf_fork, leaf_kit in _LEAF.items():
                back[f"{kit}.{leaf_kit}"] = f"{fork}.{leaf_fork}"
    return {back[k]: v for k, v in state.items()}


# ----------------------------------------------------------------------------- reading v1's pickles safely
class ImportV1Error(ValueError):
    """A fork fold folder the importer cannot take: one line naming the file and the fix."""


class UnsafePickleError(ImportV1Error, pickle.UnpicklingError):
    """A pickle that asks for a class or function outside the allow-list; refused before it is built."""


NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x writes the first, numpy 2 the second
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own array reconstructor, whatever module this numpy keeps it in
_SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar reconstructor (np.float64, np.int64, np.bool_ ...)
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5's array reconstructor (numpy.core.numeric._frombuffer)


def _ndarray(subtype, shape, dtype):
    """numpy's `_reconstruct`, for plain ndarrays only (a subclass would bring its own code)."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"array of type {subtype!r} refused: only numpy.ndarray is allowed")
    return _RECONSTRUCT(subtype, shape, dtype)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles (torch.save's) spell bytes: latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} refused: pickles spell bytes in latin-1")
    return text.encode("latin1")


# What nnU-Net v1 writes into plans.pkl and <checkpoint>.model.pkl (read off real files with pickletools):
# OrderedDicts, numpy arrays (shapes, spacings) and numpy scalars (np.float64 intensities, np.int64 axes, np.bool_),
# and plain values that pickle spells with opcodes of its own (dict, list, tuple, str, int, float, bool, None, bytes).
# Protocols 2 and 3 (Python <= 3.7 wrote 3) spell a few plain types by name instead: those are allowed too.
PLAIN = {"set": set, "frozenset": frozenset, "complex": complex, "bytes": bytes}
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    **{(m, n): t for m in ("builtins", "__builtin__") for n, t in PLAIN.items()},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
    **{(m, "_reconstruct"): _ndarray for m in NUMPY_CORE},
    **{(m, "scalar"): _SCALAR for m in NUMPY_CORE},
    **{(m, "_frombuffer"): _FROMBUFFER for m in ("numpy.core.numeric", "numpy._core.numeric")},
}


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names of ALLOWED; anything else stops the load at its name."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        """The allowed object for `module.name`, or UnsafePickleError (nothing is imported or called)."""
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused: the pickle asks for {module}.{name}, which a v1 plans or checkpoint .pkl "
                f"never holds (allowed: numpy arrays and scalars, OrderedDict, plain values); the file is not "
                f"nnU-Net v1's or was altered: do not load it, copy the file again from the machine that trained "
                f"the model") from None

    def persistent_load(self, pid):
        """v1's .pkl files have no persistent ids (torch's storages live in .model, not here)."""
        raise UnsafePickleError(f"{self.source}: refused: persistent id {pid!r} (not a v1 .pkl)")


def _short(err: BaseException) -> str:
    """The first sentence of an error message (torch's and pickle's run on for lines)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0][:200]


def restricted_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle `data` with the allow-list; UnsafePickleError for any other global, ImportV1Error if damaged."""
    try:
        return _AllowListUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError as e:  # the reconstructors' refusals do not know the file: name it
        if str(e).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: refused: {e}; the file is not nnU-Net v1's or was altered") from None
    except Exception as e:  # a truncated or garbled pickle raises many kinds
        raise ImportV1Error(f"{source}: not a readable pickle ({type(e).__name__}: {_short(e)}); copy the file "
                            f"again") from None


def restricted_load(path: str | Path) -> Any:
    """`restricted_loads` of a file."""
    return restricted_loads(Path(path).read_bytes(), str(path))


def torch_safe_globals() -> list:
    """What torch.load(weights_only=True) must also accept in a v1 checkpoint: numpy scalars in `plot_stuff`
    (the losses of every epoch), under numpy 1's and numpy 2's names, and the dtype classes they build."""
    named = [(obj, f"{m}.{n}") for (m, n), obj in ALLOWED.items() if m in NUMPY_CORE]
    dtypes = sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}, key=str)  # bool, integers, floats, complex
    return [*named, np.ndarray, np.dtype, *dtypes]


def load_v1_checkpoint(path: Path) -> dict:
    """A v1 checkpoint dict (epoch, state_dict, ...), read with weights_only=True: tensors and the allowed numpy
    values only."""
    try:
        with torch.serialization.safe_globals(torch_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's refusal; its advice to allow-list the global is not ours to give
        name = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"but got (<[^>]*>)", str(e))
        what = f"it asks for {name.group(1)}" if name else _short(e)
        raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): {what}, and a v1 checkpoint holds "
                                f"tensors, numpy scalars and plain values only; the file is not nnU-Net v1's or was "
                                f"altered: copy it again from the machine that trained the model") from None
    except Exception as e:  # a truncated zip or legacy file raises many kinds
        raise ImportV1Error(f"{path}: unreadable checkpoint ({type(e).__name__}: {_short(e)}); copy the file "
                            f"again") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ImportV1Error(f"{path}: not an nnU-Net v1 checkpoint (no state_dict); pass the fold folder that holds "
                            f"model_final_checkpoint.model")
    return ckpt


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
