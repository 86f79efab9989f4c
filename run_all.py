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
process waits and then skips them.
"""
from __future__ import annotations

import argparse
import ast
import fcntl
import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from unetpp_lib import params as P
from unetpp_lib.io import atomic_path, read_json, write_json
from unetpp_lib.layout import RunLayout, prediction_name

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
STAGES = ["01_convert", "02_plan", "03_preprocess", "04_train", "05_validate", "06_benchmark"]
FOLD_STAGES = {"04_train", "05_validate"}  # run once per fold; the others once per run
BATCH = {"headless": True}  # papermill runs keep static pictures only
READS = {"02_plan": ["01_convert"], "03_preprocess": ["02_plan"], "04_train": ["03_preprocess"],
         "05_validate": ["04_train_fold{fold}"], "06_benchmark": ["03_preprocess"]}
# how or where a stage runs, not what it makes: a change does not make a finished stage stale
# (the benchmark keeps `device`: its figures belong to it)
OPERATIONAL = {"continue_training", "num_workers", "nproc", "headless", "viewer", "show_case", "device", "run_dir"}


class StageError(RuntimeError):
    """A stage notebook failed; the message names the executed notebook and the error."""


def outputs(run: RunLayout, stage: str, fold: int | None) -> list[Path]:
    """What a finished stage leaves in the run folder."""
    if stage == "04_train":
        return [run.fold(fold).checkpoint("final"), run.fold(fold).sidecar("final")]
    if stage == "05_validate":
        return [run.fold(fold).validation.summary]
    return {"01_convert": [run.raw.dataset_json], "02_plan": [run.pre.plans, run.pre.splits],
            "03_preprocess": [run.pre.manifest], "06_benchmark": [run.benchmark_json]}[stage]


def removes(run: RunLayout, stage: str, fold: int | None) -> list[Path]:
    """What redoing a stage from scratch removes."""
    if stage == "04_train":
        f = run.fold(fold)
        return [f.train_log, f.progress, *f.all_checkpoints(), f.plans]
    if stage == "05_validate":
        f = run.fold(fold)
        return [f.validation.root, f.validation_postprocessed.root, f.test_predictions.root]
    return {"01_convert": [run.raw.root], "02_plan": [run.pre.plans, run.pre.splits, run.pre.fingerprint],
            "03_preprocess": [run.pre.store], "06_benchmark": [run.benchmark]}[stage]


def crossval_removes(run: RunLayout) -> list[Path]:
    """What redoing a cross-validation removes: the test ensemble and the summaries."""
    stems = [run.crossval_stem(), run.crossval_stem("validation_postprocessed")]
    return [run.test_ensemble.root] + [s.with_suffix(e) for s in stems for e in (".json", ".csv")]


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
    ap.add_argument("--nproc", type=int, help="processes (devices) per fold's training, DDP through torchrun")
    ap.add_argument("--force", action="store_true", help="redo the chosen stages even if complete and current")
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
    layout = RunLayout(run_dir)
    if layout.notebooks.resolve() == NOTEBOOKS:
        print(f"error: run_dir {run_dir} would write executed notebooks over notebooks/; choose another run_dir",
              file=sys.stderr)
        return 2
    layout.notebooks.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.params) as tmp:
        tmp.write_text(yaml.safe_dump(
            {"command": " ".join(["python", "run_all.py"] + (argv if argv is not None else sys.argv[1:])),
             "params_file": str(Path(args.params).resolve()), "params": {**merged, "run_dir": str(run_dir)}},
            sort_keys=False))
    plan = [(stage, None) for stage in stages if stage not in FOLD_STAGES and stage < "04"]
    plan += [(stage, fold) for fold in folds for stage in stages if stage in FOLD_STAGES]
    plan += [(stage, None) for stage in stages if stage not in FOLD_STAGES and stage > "05"]
    for stage, fold in plan:
        name = stage if fold is None else f"{stage}_fold{fold}"
        extra = {"fold": fold} if fold is not None else {}
        if stage == "04_train" and args.nproc:
            extra["nproc"] = args.nproc
        if stage == "05_validate" and len(folds) > 1:
            if fold == folds[-1]:
                extra["crossval_folds"] = list(folds)  # the last fold's run summarises them all, and
            else:  # predicts the test set with their ensemble rather than each fold on its own
                extra["predict_test"] = False
        values = stage_params(stage, layers + [extra], None)
        t0 = time.time()
        with stage_lock(run_dir, name):
            reads = upstream(run_dir, stage, fold, values)
            if not args.force and is_current(run_dir, stage, fold, values, reads):
                print(f"== {name} is complete and current (stamp {stamp_path(run_dir, name)}); skipped, --force redoes it",
                      flush=True)
                continue
            stamp_path(run_dir, name).unlink(missing_ok=True)  # not current until this attempt finishes
            new_training = stage == "04_train" and not started_matches(run_dir, name, stage, values, reads)
            if args.force or new_training:
                force_clean(run_dir, stage, fold, values, "--force" if args.force else "a new training")
            if stage == "04_train":  # continue only this very attempt, cut before it finished
                values["continue_training"] = layout.fold(fold).sidecar("latest").is_file()
            write_json(started_path(run_dir, name), {"params": _jsonable(values), "reads": reads})
            out = layout.notebooks / f"{name}.ipynb"
            latest = layout.fold(fold).checkpoint("latest").stem if values.get("continue_training") else ""
            print(f"== {name} -> {out}" + (f" (continuing from {latest})" if latest else ""), flush=True)
            try:
                run_stage(stage, values, out, args.log_output)
            except (StageError, P.ParamsError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            write_stamp(run_dir, name, values, reads, time.time() - t0)
        print(f"== {name} done in {time.time() - t0:.1f} s", flush=True)
    if "05_validate" in stages and len(folds) > 1:
        print_crossval(run_dir)
    return 0


# ----------------------------------------------------------------------------- stamps: skip and resume
def stamp_path(run_dir: Path, name: str) -> Path:
    """Where a finished stage's stamp lives."""
    return RunLayout(run_dir).stamp(name)


def digest(path: Path) -> str | None:
    """Short hash of a stamp file (None when the stage has no stamp, e.g. it was run by hand)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def upstream(run_dir: Path, stage: str, fold: int | None, values: dict) -> dict[str, str | None]:
    """The stamps this stage reads: its input stages (for a cross-validation every fold's model and validation)."""
    names = [n.format(fold=fold) for n in READS.get(stage, [])]
    for k in values.get("crossval_folds", []):
        wanted = [f"04_train_fold{k}"] + ([f"05_validate_fold{k}"] if k != fold else [])
        names += [n for n in wanted if n not in names]
    return {n: digest(stamp_path(run_dir, n)) for n in names}


def _jsonable(values: dict) -> dict:
    """Parameters as they compare after a JSON round trip."""
    return json.loads(json.dumps(values, sort_keys=True))


def _same(stage: str, a: dict, b: dict) -> bool:
    """Equal parameters, leaving out how and where the stage runs."""
    ignored = OPERATIONAL - ({"device"} if stage == "06_benchmark" else set())
    return {k: v for k, v in _jsonable(a).items() if k not in ignored} == \
        {k: v for k, v in b.items() if k not in ignored}


def outputs_there(run_dir: Path, stage: str, fold: int | None, values: dict) -> bool:
    """The files a finished stage leaves (with a cross-validation: the summary and every test-set case)."""
    run = RunLayout(run_dir)
    paths = outputs(run, stage, fold)
    if values.get("crossval_folds"):
        paths.append(run.crossval_stem().with_suffix(".json"))
        if values.get("predict_test"):
            paths += [run.test_ensemble.root / prediction_name(p) for p in run.raw.test_images()]
    return all(p.exists() for p in paths)


def is_current(run_dir: Path, stage: str, fold: int | None, values: dict, reads: dict) -> bool:
    """Stamped with these parameters and these input stamps, and its outputs are still there."""
    path = stamp_path(run_dir, stage if fold is None else f"{stage}_fold{fold}")
    if not path.is_file():
        return False
    stamp = read_json(path)
    return _same(stage, values, stamp["params"]) and stamp["reads"] == reads and \
        outputs_there(run_dir, stage, fold, values)


def started_path(run_dir: Path, name: str) -> Path:
    """Where the attempt in progress (or last cut) records its parameters and inputs."""
    return RunLayout(run_dir).stamp(name, ".started.json")


def started_matches(run_dir: Path, name: str, stage: str, values: dict, reads: dict) -> bool:
    """The last attempt of this stage had these parameters and inputs (so its partial work may be continued)."""
    path = started_path(run_dir, name)
    if not path.is_file():
        return False
    started = read_json(path)
    return _same(stage, values, started["params"]) and started["reads"] == reads


def write_stamp(run_dir: Path, name: str, values: dict, reads: dict, seconds: float) -> None:
    """Record a finished stage (atomically): parameters, input stamps, wall time."""
    write_json(stamp_path(run_dir, name), {"stage": name, "params": _jsonable(values), "reads": reads,
                                           "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


def force_clean(run_dir: Path, stage: str, fold: int | None, values: dict, why: str) -> None:
    """Remove a stage's outputs so it is redone from the start."""
    run = RunLayout(run_dir)
    paths = removes(run, stage, fold) + (crossval_removes(run) if values.get("crossval_folds") else [])
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        print(f"   {why}: removed {path}", flush=True)


@contextmanager
def stage_lock(run_dir: Path, name: str):
    """Hold an exclusive lock on a stage, so processes running folds side by side take shared stages once."""
    path = RunLayout(run_dir).stamp(name, ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"   {name}: another process is running it; waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def print_crossval(run_dir: Path) -> None:
    """The cross-validation table in the terminal."""
    from unetpp_lib.crossval import crossval_table  # here: torch loads only when there is a table to print

    path = RunLayout(run_dir).crossval_stem().with_suffix(".json")
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
