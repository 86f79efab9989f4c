#!/usr/bin/env python
"""Run the stage notebooks in order through papermill, per fold; with no arguments, the demo.

    python run_all.py [--params FILE] [--stages convert plan ...] [--folds 0 1 ...] [--nproc N]
                      [--set key=value ...] [--force]

Parameters merge as notebook defaults < headless batch settings < params file < --set,
each layer checked against `unetpp_lib.core.params.SCHEMA`. Executed notebooks, the run's
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
process waits and then skips them. The rule is unetpp_lib/core/stamps.py's (`Unit.decide`).

`--set` may be repeated (the later value wins per key); a `--set` key that none of the chosen
stages declares stops the run before anything starts (keys of a params file may serve other
stages). While a stage runs, the terminal shows its kernel's output as lines: one per training
epoch, per-case progress bars with the time left (redrawn in place on a terminal). The run ends
with a summary: each stage's status and time, each fold's liver and tumour Dice, where the
reports are and how to open them. Kernels talk over ipc sockets and end with run_all however it
ends (SIGKILL included): each watches its parent and takes its process group (loader workers,
torchrun) with it, and the next run of a stage ends whatever a killed one left (stamps.TAG).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from unetpp_lib.core import params as P
from unetpp_lib.core.io import atomic_path, read_json
from unetpp_lib.core.labels import NAMES
from unetpp_lib.core.layout import RunLayout
from unetpp_lib.core.terminal import TerminalEcho, duration
from unetpp_lib.core.stages import STAGE, run_order
from unetpp_lib.core.stamps import TAG, Unit

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
BATCH = {"headless": True}  # papermill runs keep static pictures only
# run by each kernel before the notebook: when run_all is gone, the kernel's process group (its workers, torchrun) ends
KERNEL_WATCH = "--IPKernelApp.exec_lines=__import__('unetpp_lib.core.lifetime').core.lifetime.end_with_parent()"


class StageError(RuntimeError):
    """A stage notebook failed; the message names the executed notebook and the error."""


@dataclass
class Outcome:
    """How one stage run ended, for the closing summary."""

    name: str
    status: str  # ran | skipped (current) | failed | interrupted | not run
    seconds: float | None = None
    notebook: Path | None = None
    signum: int = 0  # the signal that stopped it


def main(argv: list[str] | None = None) -> int:
    """Parse, plan, run each stage, summarise; 2 for bad arguments, 1 when a stage fails, 128 + signal when stopped."""
    args = parse_args(argv)
    stages = pick_stages(args.stages)
    try:
        layers = load_layers(args, stages)
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
    signal.signal(signal.SIGTERM, stop)  # as Ctrl-C: the kernel is shut down and the summary printed
    logging.getLogger("asyncio").addFilter(DeadKernelNoise())
    outcomes = run_units(plan_runs(run, stages, folds, layers, args.nproc), args.force)
    print_summary(run, outcomes, folds)
    return max((exit_code(o) for o in outcomes), default=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params" / "demo.yaml"), help="YAML params file (default: the demo)")
    ap.add_argument("--stages", nargs="*", help="stages to run, e.g. convert plan (default: all)")
    ap.add_argument("--folds", nargs="*", type=int, help="folds for the per-fold stages (default: the params' fold)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="override parameters; may be repeated, the later value wins")
    ap.add_argument("--nproc", type=int, help="processes (devices) per fold's training, DDP through torchrun")
    ap.add_argument("--force", action="store_true", help="redo the chosen stages even if complete and current")
    return ap.parse_args(argv)


def available_stages() -> list[str]:
    """Stage notebooks present in notebooks/, in run order."""
    return [s for s in P.STAGES if (NOTEBOOKS / STAGE[s].notebook).is_file()]


def pick_stages(names: list[str] | None) -> list[str]:
    """Resolve `convert`, `01` or `01_convert` to stage names, in run order."""
    have = available_stages()
    if not names:
        return have
    chosen = set()
    for name in names:
        match = [s for s in have if name in (s, s[:2], STAGE[s].word)]
        if not match:
            raise SystemExit(f"--stages: unknown or missing stage {name!r}; available: {', '.join(have)}")
        chosen.add(match[0])
    return [s for s in have if s in chosen]


def load_layers(args: argparse.Namespace, stages: list[str]) -> list[dict]:
    """The checked parameter layers: batch defaults, the params file, the --set overrides (paths made absolute)."""
    layers = [P.resolve_paths(layer, Path.cwd()) for layer in (BATCH, P.load(args.params), P.parse_set(args.set))]
    check_declared(layers[-1], stages)
    return layers


def check_declared(overrides: dict, stages: list[str]) -> None:
    """Refuse a --set key that none of the chosen stages declares (it would go unused), naming those that do."""
    problems = []
    for key in overrides:
        declared = P.SCHEMA[key].stages
        if not set(declared) & set(stages):
            where = f"declared by {', '.join(declared)}" if declared else "no stage notebook declares it"
            problems.append(f"'{key}' is not a parameter of {', '.join(stages)} ({where})")
    if problems:
        raise P.ParamsError("--set: " + "; ".join(problems) + ". Choose those stages with --stages, or leave the "
                            "key out; nothing was run")


def echo_params(run: RunLayout, args: argparse.Namespace, argv: list[str] | None, merged: dict) -> None:
    """Write the command, the params file and the merged parameters to `run_dir/params.yaml`."""
    run.notebooks.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.params) as tmp:
        tmp.write_text(yaml.safe_dump(
            {"command": " ".join(["python", "run_all.py"] + (argv if argv is not None else sys.argv[1:])),
             "params_file": str(Path(args.params).resolve()), "params": merged}, sort_keys=False))


def notebook_defaults(stage: str) -> dict:
    """The literals of a notebook's `parameters` cell, checked against the schema."""
    defaults = P.notebook_parameters(NOTEBOOKS / STAGE[stage].notebook)  # not papermill's: it drops `bool | str`
    return P.check(defaults, source=f"notebooks/{STAGE[stage].notebook} parameters cell")


def stage_params(stage: str, layers: list[dict]) -> dict:
    """Merge the layers over the notebook's defaults, keeping only keys the notebook declares."""
    merged = notebook_defaults(stage)
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k in merged})
    return merged


def plan_runs(run: RunLayout, stages: list[str], folds: list[int], layers: list[dict], nproc: int | None
              ) -> list[Unit]:
    """The stage runs in order with their parameters: shared stages, then fold after fold, the benchmark last."""
    units = []
    for stage, fold in run_order(stages, folds):
        extra = {"fold": fold} if fold is not None else {}
        if STAGE[stage].multi_process and nproc:
            extra["nproc"] = nproc
        if STAGE[stage].summarises_folds and len(folds) > 1:
            if fold == folds[-1]:
                extra["crossval_folds"] = list(folds)  # the last fold's run summarises them all, and
            else:  # predicts the test set with their ensemble rather than each fold on its own
                extra["predict_test"] = False
        units.append(Unit(run, stage, fold, stage_params(stage, layers + [extra])))
    return units


_STOPPED_BY: list[int] = []  # the signal that stopped the run, when it was not SIGINT itself


def stop(signum: int, frame) -> None:
    """SIGTERM handler: stop exactly as Ctrl-C does, by delivering SIGINT (asyncio's runner turns that into a clean
    cancellation; a KeyboardInterrupt raised here could land inside a library's catch-all and be lost)."""
    _STOPPED_BY.append(signum)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background of a script: SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.raise_signal(signal.SIGINT)


def run_units(units: list[Unit], force: bool) -> list[Outcome]:
    """Run the units in order until one fails or the run is stopped (Ctrl-C, SIGTERM); every unit after it is
    `not run`, whatever stands between (a stage that was itself `not run` does not let a later one start)."""
    outcomes: list[Outcome] = []
    for unit in units:
        if any(o.status in ("failed", "interrupted") for o in outcomes):
            outcomes.append(Outcome(unit.name, "not run"))
            continue
        t0 = time.time()
        try:
            outcomes.append(run_unit(unit, force))
        except KeyboardInterrupt as e:
            for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the summary short
                signal.signal(signum, signal.SIG_IGN)
            signum = _STOPPED_BY[0] if _STOPPED_BY else e.args[0] if e.args else signal.SIGINT
            print(f"\n== {unit.name} stopped by {signal.Signals(signum).name}; its kernel was shut down, "
                  f"no later stage starts", file=sys.stderr, flush=True)
            outcomes.append(Outcome(unit.name, "interrupted", time.time() - t0, executed(unit), signum))
    return outcomes


class DeadKernelNoise(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' reports of nbclient's tasks: when a stage is stopped,
    its kernel is shut down under nbclient's pending tasks, which then fail with DeadKernelError or an
    AssertionError; run_all has already said that the stage was stopped, so their tracebacks say nothing new."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a never-retrieved exception of an nbclient task, True for anything else."""
        text = record.getMessage()
        return not ("never retrieved" in text and "nbclient" in text)


def executed(unit: Unit) -> Path:
    """Where a unit's executed notebook goes."""
    return unit.run.notebooks / f"{unit.name}.ipynb"


def run_unit(unit: Unit, force: bool) -> Outcome:
    """Skip, continue or redo one stage run under its lock (see unetpp_lib/core/stamps.py)."""
    t0, out = time.time(), executed(unit)
    with unit.lock():
        if unit.decide(force) == "skip":
            print(f"== {unit.name} is complete and current (stamp {unit.stamp}); skipped, --force redoes it",
                  flush=True)
            return Outcome(unit.name, "skipped (current)", notebook=out)
        unit.start()
        latest = unit.run.fold(unit.fold).checkpoint("latest").stem if unit.values.get("continue_training") else ""
        print(f"== {unit.name} -> {out}" + (f" (continuing from {latest})" if latest else ""), flush=True)
        try:
            run_stage(unit, out)
        except (StageError, P.ParamsError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return Outcome(unit.name, "failed", time.time() - t0, out)
        unit.finish(time.time() - t0)
    print(f"== {unit.name} done in {time.time() - t0:.1f} s", flush=True)
    return Outcome(unit.name, "ran", time.time() - t0, out)


def run_stage(unit: Unit, out: Path) -> None:
    """Execute one notebook into `out` in a kernel of its own, its output shown as it comes; a failing cell
    becomes a StageError."""
    import papermill

    terminal = TerminalEcho(sys.stdout)
    with kernel_options(unit.tag) as options:
        try:
            papermill.execute_notebook(str(NOTEBOOKS / STAGE[unit.stage].notebook), str(out), parameters=unit.values,
                                       kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False,
                                       stdout_file=terminal.stream("stdout"), stderr_file=terminal.stream("stderr"),
                                       **options)
        except papermill.PapermillExecutionError as e:
            raise StageError(f"stage {unit.stage} failed in cell [{e.exec_count}]: {e.ename}: {e.evalue}\n"
                             f"  executed notebook (open it to see the whole cell output): {out}") from None
        finally:
            terminal.close()


@contextmanager
def kernel_options(tag: str) -> Iterator[dict]:
    """papermill's options for a stage's kernel: ipc sockets in a private folder (no TCP port: nothing to
    eavesdrop on, so no unencrypted-TCP warning, and no port clash between kernels), the unit's tag in its
    environment (inherited by its workers and ranks), its parent watched (KERNEL_WATCH), killed with its
    process group as soon as the notebook ends or fails, and each cell's stream output kept as it shows."""
    from traitlets.config import Config

    folder = Path(tempfile.mkdtemp(prefix="unetpp-kernel-"))  # short: a socket path has ~100 characters
    before = os.environ.get(TAG)
    os.environ[TAG] = tag
    try:
        yield {"config": Config({"KernelManager": {"transport": "ipc", "ip": str(folder / "ipc"),
                                                  "connection_file": str(folder / "kernel.json")}}),
               "extra_arguments": [KERNEL_WATCH], "shutdown_kernel": "immediate", "coalesce_streams": True}
    finally:
        if before is None:
            os.environ.pop(TAG, None)
        else:
            os.environ[TAG] = before
        shutil.rmtree(folder, ignore_errors=True)


def exit_code(outcome: Outcome) -> int:
    """1 for a failed stage, 128 + the signal for a stopped one, else 0."""
    return {"failed": 1, "interrupted": 128 + outcome.signum}.get(outcome.status, 0)


def show(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def print_table(header: list[str], rows: list[tuple]) -> None:
    """Left-aligned columns, indented."""
    width = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("   " + "  ".join(str(c).ljust(w) for c, w in zip(row, width)).rstrip())


def fold_dice(run: RunLayout, folds: list[int], folder: str = "validation") -> dict[int, dict[str, float]]:
    """Each fold's mean Dice per label ('1' liver, '2' tumour) from the summary.json of its `folder` (validation,
    validation_postprocessed), where there is one."""
    found = {}
    for k in folds:
        path = run.fold(k).predictions(folder).summary
        if path.is_file():
            mean = read_json(path)["results"]["mean"]
            found[k] = {lab: float(mean[lab]["Dice"]) for lab in NAMES if lab in mean}
    return found


def mean_sd(values: list[float]) -> str:
    """`0.9350 +- 0.0123` over the values that are numbers (sample sd, as the cross-validation summary)."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "nan"
    return f"{statistics.mean(v):.4f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"


def dice_rows(run: RunLayout, dice: dict[int, dict[str, float]], post: dict[int, dict[str, float]] | None = None,
              holdout: tuple[dict[int, dict[str, float]], ...] = ()) -> list[tuple]:
    """The Dice table: a row per fold (and the file it comes from), its post-processed row where validation wrote
    one (the decision applied to test predictions), its rows on the held-out longer scans (as predicted, then
    post-processed) where the run has them, then mean +- sd over folds when several."""
    rows = [(k, *(f"{d.get(lab, math.nan):.4f}" for lab in NAMES), show(run.fold(k).validation.summary))
            for k, d in dice.items()]
    rows += [(f"{k} post-processed", *(f"{d.get(lab, math.nan):.4f}" for lab in NAMES),
              show(run.fold(k).validation_postprocessed.summary)) for k, d in (post or {}).items()]
    rows += [(f"{k} held-out longer scans{' post-processed' if pp else ''}",
              *(f"{d.get(lab, math.nan):.4f}" for lab in NAMES),
              show(run.fold(k).predictions("holdout" + ("_postprocessed" if pp else "")).summary))
             for pp, found in enumerate(holdout or ()) for k, d in found.items()]
    if len(dice) > 1:
        rows.append(("mean +- sd", *(mean_sd([d.get(lab, math.nan) for d in dice.values()]) for lab in NAMES),
                     show(run.crossval_stem().with_suffix(".json"))))
    return rows


def report_paths(run: RunLayout, folds: list[int]) -> dict[str, list[Path]]:
    """Where the run's report is: executed notebooks, QA pictures, summary files (those that exist)."""
    fold = [run.fold(k) for k in folds]
    pictures = [run.qa] + [p for f in fold for p in (f.progress, f.validation.gallery, f.validation.qa("-").parent)]
    summaries = [f.validation.summary for f in fold] + [run.crossval_stem().with_suffix(s) for s in (".json", ".csv")]
    return {"executed notebooks": [run.notebooks], "QA pictures": [p for p in pictures if p.exists()],
            "summaries": [p for p in summaries + [run.benchmark_json] if p.exists()]}


def jupyter_command(run: RunLayout) -> str:
    """The command that opens the executed notebooks in JupyterLab (or how to install it)."""
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.is_file():
        return f"pip install -e '.[viewers]', then: jupyter lab {show(run.notebooks)}"
    return f"{show(jupyter)} lab {show(run.notebooks)}"


def print_summary(run: RunLayout, outcomes: list[Outcome], folds: list[int]) -> None:
    """The closing summary: each stage run's status and time, each fold's Dice, where the report is."""
    print(f"\n== summary of {show(run.root)}")
    print_table(["stage", "status", "time"],
                [(o.name, o.status, "-" if o.seconds is None else duration(o.seconds)) for o in outcomes])
    dice = fold_dice(run, folds)
    if dice:
        print()
        print_table(["fold", *(f"{name} Dice" for name in NAMES.values()), "from"],
                    dice_rows(run, dice, fold_dice(run, folds, "validation_postprocessed"),
                              (fold_dice(run, folds, "holdout"), fold_dice(run, folds, "holdout_postprocessed"))))
    print()
    for o in outcomes:
        if o.status in ("failed", "interrupted"):
            print(f"   {o.name} {o.status}; its executed notebook, with the output up to there: {show(o.notebook)}")
    width = max(80, shutil.get_terminal_size().columns - 1)
    for what, paths in report_paths(run, folds).items():
        if paths:
            print(textwrap.fill(f"{what}: {', '.join(show(p) for p in paths)}", width, initial_indent="   ",
                                subsequent_indent="      ", break_long_words=False, break_on_hyphens=False))
    print(f"   open them: {jupyter_command(run)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
