"""Parameters: one schema for every key a params file, `--set` or a notebook may hold.

The chain is notebook defaults < `params/<name>.yaml` < command-line `--set`; every
layer is checked here, so a typo or a wrong type fails at once with the key and the
file named, instead of hours later inside a stage.
"""
from __future__ import annotations

import ast
import copy
import difflib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

from .stages import TABLE


class ParamsError(ValueError):
    """Unknown keys, wrong types or bad values in a parameter source."""


@dataclass(frozen=True)
class Key:
    """Type (as written in notebooks), meaning and allowed values of one parameter."""

    type: str
    help: str
    choices: tuple = ()
    minimum: float | None = None
    length: int | None = None  # for lists
    pattern: str | None = None  # a regular expression a string value may match instead of one of `choices`
    stages: tuple[str, ...] = ()  # notebooks that declare it
    operational: bool = False  # how or where a stage runs, not what it makes: a change leaves finished stages current
    path: bool = False  # a file or folder: relative ones are resolved from where run_all.py starts
    default: Any = None  # the one declaration of its default: notebooks' parameters cells repeat it (tested),
    # the settings dataclasses take it through `setting`


STAGES = tuple(s.name for s in TABLE)  # run order (core/stages.py)
CONVERT, PLAN, PREPROCESS, TRAIN, VALIDATE, BENCH = (  # the schema's names for the table's stages
    "01_convert", "02_plan", "03_preprocess", "04_train", "05_validate", "06_benchmark")

# `stages`: the notebooks whose parameters cell declares the key (tests/test_params.py holds them to it);
# a key with none is accepted from files and --set but read by library code only
SCHEMA: dict[str, Key] = {
    # shared by several stages
    "run_dir": Key("str", "folder the run lives in (its layout: unetpp_lib/core/layout.py)", stages=STAGES,
                   operational=True, path=True, default="../runs/demo"),
    "msd_dir": Key("str", "MSD task folder or its downloaded .tar/.tar.gz (Task03_Liver layout); empty: synthetic data in run_dir/msd",
                   stages=(CONVERT,), path=True, default=""),
    "fold": Key("int", "cross-validation fold", minimum=0, stages=(TRAIN, VALIDATE), default=0),
    "device": Key("str", "compute device: auto, cpu, cuda, cuda:N, npu or npu:N",
                  choices=("auto", "cpu", "cuda", "npu"), pattern=r"(cuda|npu):\d+", stages=(TRAIN, VALIDATE, BENCH),
                  operational=True, default="auto"),
    "num_workers": Key("int", "worker processes for per-case work (0 or 1: in the calling process)", minimum=0,
                       stages=(CONVERT, PLAN, PREPROCESS, TRAIN, VALIDATE), operational=True, default=2),
    "seed": Key("int", "random seed", stages=(CONVERT, PREPROCESS, TRAIN), default=0),
    "headless": Key("bool", "batch run (papermill): keep static pictures, skip interactive widgets",
                    stages=(CONVERT, VALIDATE), operational=True, default=False),
    "viewer": Key("str", "3D viewer backend", choices=("niivue", "itkwidgets", "png"), stages=(CONVERT, VALIDATE),
                  operational=True, default="niivue"),
    "show_case": Key("str", "case to show in the viewer (empty: the first training case with a tumour)",
                     stages=(CONVERT, PREPROCESS, VALIDATE), operational=True, default=""),
    # 01_convert: synthetic data
    "synth_num_training": Key("int", "synthetic training cases (with labels)", minimum=1, stages=(CONVERT,), default=8),
    "synth_num_test": Key("int", "synthetic test cases (no labels)", minimum=0, stages=(CONVERT,), default=2),
    "synth_shape": Key("list[int]", "synthetic field of view in voxels (z, y, x) at Task03's median spacing",
                       minimum=4, length=3, stages=(CONVERT,), default=[48, 96, 96]),
    "synth_quirks": Key("bool", "mimic the real tarball: ._ shadow files, id gaps, mixed dtypes, float labels",
                        stages=(CONVERT,), default=True),
    "synth_inplane_mm": Key("list[float]", "synthetic in-plane pixel spacing range (mm), drawn uniform per case",
                            minimum=0.05, length=2, stages=(CONVERT,), default=[0.6, 0.9]),
    "synth_slice_mm": Key("list[float]", "synthetic slice spacing range (mm), drawn log-uniform per case",
                          minimum=0.05, length=2, stages=(CONVERT,), default=[0.7, 5.0]),
    "synth_holdout_cases": Key("int", "held-out labelled synthetic scans (another seed, longer scans) that 05 "
                               "predicts and scores with every fold; 0: none", minimum=0, stages=(CONVERT,), default=0),
    "synth_holdout_length": Key("float", "the held-out scans' length over the training scans'", minimum=0.1,
                                stages=(CONVERT,), default=1.6),
    # 02_plan
    "planner": Key("str", "nnunet_v1: the original's rules (plain U-Net memory proxy); unetpp: sized for UNet++ "
                   "on device_memory_gb", choices=("nnunet_v1", "unetpp"), stages=(PLAN,), default="nnunet_v1"),
    "device_memory_gb": Key("float", "accelerator memory the unetpp planner sizes patch and batch for", minimum=1,
                            stages=(PLAN,), default=8.0),
    "plan_overrides": Key("dict", "planned values to replace, e.g. {batch_size: 4, patch_size: [96, 160, 160]}",
                          stages=(PLAN,), default={}),
    "splits_file": Key("str", "JSON list of {train: [...], val: [...]} per fold; empty: nnU-Net's 5-fold split",
                       stages=(PLAN,), path=True, default=""),
    # 04_train (train.TrainConfig has a field of each name)
    "num_epochs": Key("int", "training epochs", minimum=1, stages=(TRAIN,), default=1000),
    "iterations_per_epoch": Key("int", "training steps per epoch", minimum=1, stages=(TRAIN,), default=250),
    "val_iterations": Key("int", "validation batches per epoch (pseudo-Dice)", minimum=0, stages=(TRAIN,), default=50),
    "initial_lr": Key("float", "SGD learning rate at epoch 0", minimum=0, stages=(TRAIN,), default=0.01),
    "momentum": Key("float", "SGD Nesterov momentum", minimum=0, stages=(TRAIN,), default=0.99),
    "weight_decay": Key("float", "SGD weight decay", minimum=0, stages=(TRAIN,), default=3e-05),
    "lr_exponent": Key("float", "poly schedule exponent: lr x (1 - epoch/epochs)^exponent", minimum=0, stages=(TRAIN,),
                       default=0.9),
    "grad_clip": Key("float", "gradient norm clipping", minimum=0, stages=(TRAIN,), default=12.0),
    "zero_dice_epoch": Key("int", "epoch (0-based) after which a pseudo-Dice of exactly 0 lowers momentum to 0.95 and "
                           "re-initialises the weights, as nnU-Net v1 (100); -1: never", minimum=-1, stages=(TRAIN,),
                               default=100),
    "precision": Key("str", "autocast: auto (measured on this machine by a short probe, autotune.py: fp32 or a "
                     "faster native bf16 on a CPU, fp16 + scaler on a GPU as nnU-Net v1), bf16, fp16 or fp32",
                     choices=("auto", "bf16", "fp16", "fp32"), stages=(TRAIN, VALIDATE), operational=True,
                         default="auto"),
    "channels_last": Key("bool | str", "channels-last 3D memory format: auto (measured by the probe), true, false",
                         choices=("auto", True, False), stages=(TRAIN, VALIDATE), operational=True, default="auto"),
    "compile": Key("bool", "torch.compile the model (05_validate: its forward pass, speed only)",
                   stages=(TRAIN, VALIDATE), default=False),
    "save_uncertainty": Key("bool", "05_validate: write uncertainty maps beside the validation, held-out, test and "
                            "ensemble predictions and score them (entropy, spread, confidence; nn/infer.py)",
                            stages=(VALIDATE,), default=True),
    "ds_weights": Key("str", "deep supervision weights: exponential (8:4:2:1:0) or equal",
                      choices=("exponential", "equal"), stages=(TRAIN,), default="exponential"),
    "augment": Key("bool", "moreDA augmentation on the device", stages=(TRAIN,), default=True),
    "save_every": Key("int", "write the latest checkpoint every N epochs", minimum=1, stages=(TRAIN,), default=50),
    "continue_training": Key("bool", "resume from the latest checkpoint (model, optimiser, epoch, log, RNG)",
                             stages=(TRAIN,), operational=True, default=False),
    "nproc": Key("int", "processes (devices) for DDP through torchrun; 1: this process", minimum=1, stages=(TRAIN,),
                 operational=True, default=1),
    # 05_validate (infer.InferenceSettings has a field of each name it reads)
    "checkpoint": Key("str", "checkpoint to predict with", choices=("final", "best", "latest"), stages=(VALIDATE,),
                      default="final"),
    "step_size": Key("float", "sliding-window step as a fraction of the patch", minimum=0.05, stages=(VALIDATE,),
                     default=0.5),
    "mirror_axes": Key("list[int]", "test-time mirroring: axes to flip (all 8 combinations of [0, 1, 2]; [] none)",
                       stages=(VALIDATE,), default=[0, 1, 2]),
    "head_mode": Key("str", "UNet++ output: deepest head, average of heads, or pruned at pruned_level",
                     choices=("deepest", "average", "pruned"), stages=(VALIDATE,), default="deepest"),
    "pruned_level": Key("int", "level k of the pruned (fast) mode: runs the sub-network up to X(0,k)", minimum=1,
                        stages=(VALIDATE,), default=1),
    "tolerance_mm": Key("float", "normalised surface Dice tolerance (mm)", minimum=0, stages=(VALIDATE,), default=2.0),
    "predict_test": Key("bool", "also predict the run's test images", stages=(VALIDATE,), default=True),
    "crossval_folds": Key("list[int]", "folds to summarise as a cross-validation and whose models predict the test "
                          "images as an ensemble (run_all passes its folds to the last fold's run); [] none",
                          minimum=0, stages=(VALIDATE,), default=[]),
    "review_source": Key("str", "predictions the review browser opens: auto (crossval with crossval_folds, else "
                         "validation), validation, validation_postprocessed, crossval, test or test_ensemble",
                         choices=("auto", "validation", "validation_postprocessed", "crossval", "test", "test_ensemble"),
                         stages=(VALIDATE,), operational=True, default="auto"),
    # 06_benchmark (benchmark.BenchSettings has a field of each name)
    "bench_plan": Key("str", "run: the run's plans.json; task03: the Task03 plan (128^3, batch 2)",
                      choices=("run", "task03"), stages=(BENCH,), default="run"),
    "bench_batch_sizes": Key("list[int]", "training batch sizes to time (empty: the plan's)", minimum=1,
                             stages=(BENCH,), default=[]),
    "bench_precisions": Key("list[str]", "precisions to time: auto, fp32, fp16, bf16", stages=(BENCH,),
                            default=['auto']),
    "bench_channels_last": Key("list[bool]", "memory formats to time: [false], [false, true]", stages=(BENCH,),
                               default=[False]),
    "bench_compile": Key("list[bool]", "torch.compile settings to time: [false], [false, true]", stages=(BENCH,),
                         default=[False]),
    "bench_warmup": Key("int", "untimed warm-up steps (the seed: 10)", minimum=0, stages=(BENCH,), default=10),
    "bench_steps": Key("int", "timed steps (the seed: 100)", minimum=1, stages=(BENCH,), default=100),
    "bench_inference_shape": Key("list[int]", "case size (z, y, x) at target spacing to infer (empty: the median)",
                                 stages=(BENCH,), default=[]),
    "bench_head_modes": Key("list[str]", "inference head modes to time: deepest, average, pruned", stages=(BENCH,),
                            default=['deepest', 'average', 'pruned']),
    "bench_profile_steps": Key("int", "training steps under torch.profiler (0: none)", minimum=0, stages=(BENCH,),
                               default=3),
    "bench_scale_cases": Key("int", "real-size (482 x 512 x 512) synthetic cases to convert, plan and preprocess "
                             "for the at-scale preprocessing figures (0: off)", minimum=0, stages=(BENCH,), default=0),
    "bench_uncertainty": Key("bool", "time inference with and without the uncertainty maps (05_validate's "
                             "save_uncertainty) on the inference shape", stages=(BENCH,), default=True),
}

_PY_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}


def _type_ok(value: Any, spec: str) -> bool:
    """Whether `value` fits the type spec (`int`, `list[float]`, `bool | str`, ...); bools are not ints."""
    if " | " in spec:
        return any(_type_ok(value, part) for part in spec.split(" | "))
    if spec.startswith("list[") and spec.endswith("]"):
        return isinstance(value, list) and all(_type_ok(v, spec[5:-1]) for v in value)
    if spec in ("int", "float") and isinstance(value, bool):
        return False
    return isinstance(value, _PY_TYPES[spec])


def _value_problem(name: str, value: Any, key: Key) -> str | None:
    """Describe what is wrong with one value, or None when it is fine."""
    if not _type_ok(value, key.type):
        return f"'{name}' must be {key.type} ({key.help}), got {type(value).__name__} {value!r}"
    if key.length is not None and len(value) != key.length:
        return f"'{name}' must hold {key.length} values, got {value!r}"
    matches = key.pattern is not None and isinstance(value, str) and re.fullmatch(key.pattern, value)
    if key.choices and value not in key.choices and not matches:
        also = f" or match {key.pattern}" if key.pattern else ""
        return f"'{name}' must be one of {list(key.choices)}{also}, got {value!r}"
    if key.minimum is not None:
        items = value if isinstance(value, list) else [value]
        if any(v < key.minimum for v in items):
            return f"'{name}' must be >= {key.minimum}, got {value!r}"
    return None


def check(values: dict[str, Any], source: str = "parameters") -> dict[str, Any]:
    """Validate keys, types and values against SCHEMA; raise one ParamsError listing all problems."""
    problems = []
    for name, value in values.items():
        if name not in SCHEMA:
            close = difflib.get_close_matches(name, SCHEMA, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(SCHEMA)})"
            problems.append(f"unknown key '{name}'{hint}")
            continue
        problem = _value_problem(name, value, SCHEMA[name])
        if problem:
            problems.append(problem)
    if problems:
        raise ParamsError(f"{source}: " + "; ".join(problems) + ". Fix these keys in " + source + ".")
    return dict(values)


def notebook_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The literals of a notebook's `parameters` cell, read with Python's own parser: every annotation form
    (`bool | str` included, which papermill's inspector drops) and no kernel."""
    cells = json.loads(Path(path).read_text())["cells"]
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ParamsError(f"{path}: no cell tagged 'parameters'")
    values = {}
    for node in ast.parse("".join(cell["source"])).body:
        if not isinstance(node, (ast.AnnAssign, ast.Assign)):
            raise ParamsError(f"{path}: the parameters cell holds only `name: type = literal` lines, not "
                              f"{ast.unparse(node)!r}")
        target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
        values[target.id] = ast.literal_eval(node.value)
    return values


def stage_keys(stage: str) -> list[str]:
    """The parameters a stage notebook declares (schema order)."""
    if stage not in STAGES:
        raise ParamsError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return [name for name, key in SCHEMA.items() if stage in key.stages]


def resolve(stage: str, namespace: dict[str, Any]) -> SimpleNamespace:
    """A notebook's parameters, picked from `namespace` (its `globals()`) by the schema's list for `stage`
    and checked; `run_dir` made absolute. Later cells read them as `p.<name>`."""
    source = f"{stage} parameters"
    missing = [name for name in stage_keys(stage) if name not in namespace]
    if missing:
        raise ParamsError(f"{source}: {', '.join(map(repr, missing))} not set; the schema declares them for {stage}, "
                          "so its parameters cell must too")
    stray = [name for name in SCHEMA if name in namespace and stage not in SCHEMA[name].stages]
    if stray:  # e.g. papermill -p fold 1 on a stage that has no fold: it would be ignored
        problems = [f"'{n}' is not a parameter of {stage} (read by {', '.join(SCHEMA[n].stages) or 'the library'})"
                    for n in stray]
        raise ParamsError(f"{source}: " + "; ".join(problems) + ". Leave them out.")
    values = check({name: namespace[name] for name in stage_keys(stage)}, source=source)
    values["run_dir"] = str(Path(values["run_dir"]).resolve())  # relative to the notebook when run by hand
    return SimpleNamespace(**values)


def setting(name: str) -> Any:
    """A settings dataclass field whose default is the schema's for the parameter `name` (a fresh copy each time)."""
    value = SCHEMA[name].default
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(value))
    return field(default=value)


def build(cls: type[T], p: SimpleNamespace) -> T:
    """The dataclass `cls` from resolved parameters: each field takes the parameter of its own name
    (fields with no such parameter keep their defaults)."""
    return cls(**{f.name: getattr(p, f.name) for f in fields(cls) if hasattr(p, f.name)})


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a YAML params file."""
    return check(read_yaml(path), source=str(path))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file of key: value settings, unchecked (params files; the GPU check's settings)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (the shipped ones are in params/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def parse_set(items: list[str], schema: bool = True) -> dict[str, Any]:
    """Parse `key=value` overrides; values are read as YAML (`fold=1` is an int, `[1,2]` a list); checked against
    SCHEMA unless `schema` is False (settings of a dataclass, checked by `check_fields`)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected key=value, e.g. --set fold=1")
        key, _, raw = item.partition("=")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return check(out, source="--set") if schema else out


def check_fields(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """Check settings against a dataclass's fields: known names, and each value of its default's type (an int
    where a float is expected; bools are not ints)."""
    known, defaults = {f.name for f in fields(cls)}, cls()
    for key, value in values.items():
        if key not in known:
            raise ParamsError(f"unknown {what} {key!r} (known: {', '.join(sorted(known))})")
        want = type(getattr(defaults, key))
        fits = isinstance(value, want) or (want is float and isinstance(value, int))
        if not fits or isinstance(value, bool) != (want is bool):
            raise ParamsError(f"{what} {key!r} must be {want.__name__}, got {value!r}")
    return values


def resolve_paths(values: dict[str, Any], base: str | os.PathLike) -> dict[str, Any]:
    """Make the path-valued keys (`path=True` in the schema) absolute, relative to `base`."""
    out = dict(values)
    for key in (name for name, k in SCHEMA.items() if k.path):
        if out.get(key):
            out[key] = str((Path(base) / out[key]).resolve())
    return out
