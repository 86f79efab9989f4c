#!/usr/bin/env python
"""Run the stage notebooks in order through papermill, per fold; with no arguments, the demo.

    python run_all.py [--params FILE] [--stages convert plan ...] [--folds 0 1 ...] [--set key=value ...]

Parameters merge as notebook defaults < headless batch settings < params file < --set,
each layer checked against `unetpp_lib.params.SCHEMA`. Executed notebooks, the run's
report, go to `run_dir/notebooks/` (fold stages as `04_train_fold<k>.ipynb`); the
merged parameters are echoed to `run_dir/params.yaml`.
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import yaml

from unetpp_lib import params as P
from unetpp_lib.io import atomic_path

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
STAGES = ["01_convert", "02_plan", "03_preprocess", "04_train", "05_validate", "06_benchmark"]
FOLD_STAGES = {"04_train", "05_validate"}  # run once per fold; the others once per run
BATCH = {"headless": True}  # papermill runs keep static pictures only


class StageError(RuntimeError):
    """A stage notebook failed; the message names the executed notebook and the error."""


def available_stages() -> list[str]:
    """Stage notebooks present in notebooks/, in run order."""
    return [s for s in STAGES if (NOTEBOOKS / f"{s}.ipynb").is_file()]


def pick_stages(names: list[str] | None) -> list[str]:
    """Resolve `convert`, `01` or `01_convert` to stage names, in run order."""
    have = available_stages()
    if not names:
        return have
    chosen = set()
    for name in names:
        match = [s for s in have if name in (s, s[:2], s[3:])]
        if not match:
            raise SystemExit(f"--stages: unknown or missing stage {name!r}; available: {', '.join(have)}")
        chosen.add(match[0])
    return [s for s in have if s in chosen]


def notebook_defaults(stage: str) -> dict:
    """The literals of a notebook's `parameters` cell, checked against the schema."""
    import papermill

    found = papermill.inspect_notebook(str(NOTEBOOKS / f"{stage}.ipynb"))
    defaults = {k: ast.literal_eval(v["default"]) for k, v in found.items()}
    return P.check(defaults, source=f"notebooks/{stage}.ipynb parameters cell")


def stage_params(stage: str, layers: list[dict], fold: int | None) -> dict:
    """Merge the layers over the notebook's defaults, keeping only keys the notebook declares."""
    merged = notebook_defaults(stage)
    for layer in layers + ([{"fold": fold}] if fold is not None else []):
        merged.update({k: v for k, v in layer.items() if k in merged})
    return merged


def run_stage(stage: str, values: dict, out: Path, log_output: bool) -> None:
    """Execute one notebook into `out`; turn a failing cell into a StageError."""
    import papermill

    try:
        papermill.execute_notebook(str(NOTEBOOKS / f"{stage}.ipynb"), str(out), parameters=values,
                                   kernel_name="python3", cwd=str(NOTEBOOKS), log_output=log_output,
                                   progress_bar=not log_output)
    except papermill.PapermillExecutionError as e:
        raise StageError(f"stage {stage} failed in cell [{e.exec_count}]: {e.ename}: {e.evalue}\n"
                         f"  executed notebook (open it to see the whole cell output): {out}") from None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, merge parameters, run the stages; 1 when a stage fails."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params" / "demo.yaml"), help="YAML params file (default: the demo)")
    ap.add_argument("--stages", nargs="*", help="stages to run, e.g. convert plan (default: all)")
    ap.add_argument("--folds", nargs="*", type=int, help="folds for the per-fold stages (default: the params' fold)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override parameters")
    ap.add_argument("--log-output", action="store_true", help="stream cell output to the terminal")
    args = ap.parse_args(argv)
    stages = pick_stages(args.stages)
    try:
        layers = [BATCH, P.load(args.params), P.parse_set(args.set)]
    except P.ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layers = [P.resolve_paths(layer, Path.cwd()) for layer in layers]
    merged = {k: v for layer in layers for k, v in layer.items()}
    run_dir = Path(merged.get("run_dir") or ROOT / "runs" / "demo")
    layers.append({"run_dir": str(run_dir)})
    folds = args.folds if args.folds else [merged.get("fold", 0)]
    if (run_dir / "notebooks").resolve() == NOTEBOOKS:
        print(f"error: run_dir {run_dir} would write executed notebooks over notebooks/; choose another run_dir",
              file=sys.stderr)
        return 2
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "params.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(
            {"command": " ".join(["python", "run_all.py"] + (argv if argv is not None else sys.argv[1:])),
             "params_file": str(Path(args.params).resolve()), "params": {**merged, "run_dir": str(run_dir)}},
            sort_keys=False))
    for stage in stages:
        for fold in (folds if stage in FOLD_STAGES else [None]):
            name = stage if fold is None else f"{stage}_fold{fold}"
            out = run_dir / "notebooks" / f"{name}.ipynb"
            t0 = time.time()
            print(f"== {name} -> {out}", flush=True)
            try:
                run_stage(stage, stage_params(stage, layers, fold), out, args.log_output)
            except (StageError, P.ParamsError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"== {name} done in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
