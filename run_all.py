#!/usr/bin/env python
"""Run the stage notebooks in order through papermill, per fold; with no arguments, the demo.

    python run_all.py [--params FILE] [--stages convert plan ...] [--folds 0 1 ...] [--nproc N]
                      [--set key=value ...] [--force]

Parameters merge as notebook defaults < headless batch settings < params file < --set,
each layer checked against `unetpp_lib.params.SCHEMA`. Executed notebooks, the run's
report, go to `run_dir/notebooks/` (fold stages as `04_train_fold<k>.ipynb`); the
merged parameters are echoed to `run_dir/params.yaml`.

convert, plan and preprocess run once; train and validate run fold after fold; with
several folds the last fold's validation also writes `run_dir/crossval_summary.json`
(+ `.csv`, `qa/crossval.png`) and predicts the test images with the ensemble of the folds
(`run_dir/test_ensemble/`). A stage that finished is stamped in `run_dir/stages/` with
its parameters and the stamps of the stages it read; it is skipped while that all still
holds and its outputs are there (`--force` redoes it). A stopped run started again
continues: finished stages are skipped, and the library resumes the one that was cut
(cases already converted, preprocessed or predicted are kept; training continues from
the latest checkpoint when the cut attempt had the same parameters and inputs, recorded in
`stages/<stage>.started.json`, and starts over otherwise). Folds may run side by side
(one process per device): shared stages are taken under a file lock, so the second
process waits and then skips them. The rule is unetpp_lib/stamps.py's (`Unit.decide`).
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import yaml

from unetpp_lib import params as P
from unetpp_lib.io import atomic_path, read_json
from unetpp_lib.layout import RunLayout
from unetpp_lib.stamps import FOLD_STAGES, Unit

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
BATCH = {"headless": True}  # papermill runs keep static pictures only


class StageError(RuntimeError):
    """A stage notebook failed; the message names the executed notebook and the error."""


def main(argv: list[str] | None = None) -> int:
    """Parse, plan the runs, run each stage, report; 2 for bad arguments, 1 when a stage fails."""
    args = parse_args(argv)
    stages = pick_stages(args.stages)
    try:
        layers = [P.resolve_paths(layer, Path.cwd()) for layer in (BATCH, P.load(args.params), P.parse_set(args.set))]
    except P.ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    merged = {k: v for layer in layers for k, v in layer.items()}
    run = RunLayout(merged.get("run_dir") or ROOT / "runs" / "demo")
    layers.append({"run_dir": str(run.root)})
    if run.notebooks.resolve() == NOTEBOOKS:
        print(f"error: run_dir {run.root} would write executed notebooks over notebooks/; choose another run_dir",
              file=sys.stderr)
        return 2
    echo_params(run, args, argv, {**merged, "run_dir": str(run.root)})
    folds = args.folds if args.folds else [merged.get("fold", 0)]
    for unit in plan_runs(run, stages, folds, layers, args.nproc):
        if not run_unit(unit, args.force, args.log_output):
            return 1
    if "05_validate" in stages and len(folds) > 1:
        print_crossval(run)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params" / "demo.yaml"), help="YAML params file (default: the demo)")
    ap.add_argument("--stages", nargs="*", help="stages to run, e.g. convert plan (default: all)")
    ap.add_argument("--folds", nargs="*", type=int, help="folds for the per-fold stages (default: the params' fold)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override parameters")
    ap.add_argument("--nproc", type=int, help="processes (devices) per fold's training, DDP through torchrun")
    ap.add_argument("--force", action="store_true", help="redo the chosen stages even if complete and current")
    ap.add_argument("--log-output", action="store_true", help="stream cell output to the terminal")
    return ap.parse_args(argv)


def available_stages() -> list[str]:
    """Stage notebooks present in notebooks/, in run order."""
    return [s for s in P.STAGES if (NOTEBOOKS / f"{s}.ipynb").is_file()]


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


def echo_params(run: RunLayout, args: argparse.Namespace, argv: list[str] | None, merged: dict) -> None:
    """Write the command, the params file and the merged parameters to `run_dir/params.yaml`."""
    run.notebooks.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.params) as tmp:
        tmp.write_text(yaml.safe_dump(
            {"command": " ".join(["python", "run_all.py"] + (argv if argv is not None else sys.argv[1:])),
             "params_file": str(Path(args.params).resolve()), "params": merged}, sort_keys=False))


def notebook_defaults(stage: str) -> dict:
    """The literals of a notebook's `parameters` cell, checked against the schema."""
    import papermill

    found = papermill.inspect_notebook(str(NOTEBOOKS / f"{stage}.ipynb"))
    defaults = {k: ast.literal_eval(v["default"]) for k, v in found.items()}
    return P.check(defaults, source=f"notebooks/{stage}.ipynb parameters cell")


def stage_params(stage: str, layers: list[dict]) -> dict:
    """Merge the layers over the notebook's defaults, keeping only keys the notebook declares."""
    merged = notebook_defaults(stage)
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k in merged})
    return merged


def plan_runs(run: RunLayout, stages: list[str], folds: list[int], layers: list[dict], nproc: int | None
              ) -> list[Unit]:
    """The stage runs in order with their parameters: shared stages, then fold after fold, the benchmark last."""
    order = [(stage, None) for stage in stages if stage not in FOLD_STAGES and stage < "04"]
    order += [(stage, fold) for fold in folds for stage in stages if stage in FOLD_STAGES]
    order += [(stage, None) for stage in stages if stage not in FOLD_STAGES and stage > "05"]
    units = []
    for stage, fold in order:
        extra = {"fold": fold} if fold is not None else {}
        if stage == "04_train" and nproc:
            extra["nproc"] = nproc
        if stage == "05_validate" and len(folds) > 1:
            if fold == folds[-1]:
                extra["crossval_folds"] = list(folds)  # the last fold's run summarises them all, and
            else:  # predicts the test set with their ensemble rather than each fold on its own
                extra["predict_test"] = False
        units.append(Unit(run, stage, fold, stage_params(stage, layers + [extra])))
    return units


def run_unit(unit: Unit, force: bool, log_output: bool) -> bool:
    """Skip, continue or redo one stage run under its lock (see unetpp_lib/stamps.py); False when it failed."""
    t0 = time.time()
    with unit.lock():
        if unit.decide(force) == "skip":
            print(f"== {unit.name} is complete and current (stamp {unit.stamp}); skipped, --force redoes it",
                  flush=True)
            return True
        unit.start()
        out = unit.run.notebooks / f"{unit.name}.ipynb"
        latest = unit.run.fold(unit.fold).checkpoint("latest").stem if unit.values.get("continue_training") else ""
        print(f"== {unit.name} -> {out}" + (f" (continuing from {latest})" if latest else ""), flush=True)
        try:
            run_stage(unit.stage, unit.values, out, log_output)
        except (StageError, P.ParamsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return False
        unit.finish(time.time() - t0)
    print(f"== {unit.name} done in {time.time() - t0:.1f} s", flush=True)
    return True


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


def print_crossval(run: RunLayout) -> None:
    """The cross-validation table in the terminal."""
    from unetpp_lib.crossval import crossval_table  # here: torch loads only when there is a table to print

    path = run.crossval_stem().with_suffix(".json")
    if not path.is_file():
        return
    rows = crossval_table(read_json(path))
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(f"== cross-validation ({path})")
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))


if __name__ == "__main__":
    sys.exit(main())
