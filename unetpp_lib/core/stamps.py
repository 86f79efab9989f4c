"""Whether a stage run is current: run_all.py's skip, continue and redo, behind `Unit.decide`.

currency.py's rule at the scale of a stage. A unit is one stage, or one fold of a fold stage
(`04_train_fold1`); its key is its parameters, its inputs are the stamps of the units it read.
When it finishes, its stamp (`stages/<unit>.json`) records both, so a change anywhere
upstream makes everything after it stale. A unit is skipped while its stamp
holds and its outputs are there; an attempt in progress records itself in
`stages/<unit>.started.json`, so a cut training continues only when the next attempt has the
same parameters and inputs. Parameters marked operational in the schema (how or where a stage
runs) are not compared. run_all.py runs the notebooks; every process working for a unit carries
its tag in the environment (TAG), so the next holder of the unit's lock ends what a killed
attempt left behind before it starts.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .currency import jsonable
from .io import read_json, write_json
from .layout import PredLayout, RunLayout, prediction_name
from .lifetime import end_processes, tagged
from .params import SCHEMA
from .stages import STAGE

OPERATIONAL = {name for name, key in SCHEMA.items() if key.operational}  # not compared between attempts
TAG = "UNETPP_UNIT"  # environment variable of a unit's kernel (and so of its workers and ranks): the unit's tag


def unit_name(stage: str, fold: int | None) -> str:
    """`02_plan`, or `04_train_fold1` for one fold of a fold stage."""
    return stage if fold is None else f"{stage}_fold{fold}"


def crossval_removes(run: RunLayout) -> list[Path]:
    """What redoing a cross-validation removes: the test ensemble and the summaries."""
    stems = [run.crossval_stem(), run.crossval_stem("validation_postprocessed")]
    return [run.test_ensemble.root] + [s.with_suffix(e) for s in stems for e in (".json", ".csv")]


def digest(path: Path) -> str | None:
    """Short hash of a stamp file (None when the stage has no stamp, e.g. it was run by hand)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


@dataclass
class Unit:
    """One stage run with its parameters: `decide`, then `start`, run the notebook, `finish`."""

    run: RunLayout
    stage: str
    fold: int | None
    values: dict  # the notebook's parameters; `start` sets continue_training for a training
    reads: dict[str, str | None] = field(default_factory=dict)  # input stamps, as `decide` saw them
    redo_because: str = ""  # why `decide` chose "fresh"

    @property
    def name(self) -> str:
        return unit_name(self.stage, self.fold)

    @property
    def stamp(self) -> Path:
        return self.run.stamp(self.name)

    @property
    def started(self) -> Path:
        return self.run.stamp(self.name, ".started.json")

    @property
    def tag(self) -> str:
        """The TAG value of the processes working for this unit: its lock file's path."""
        return str(self.run.stamp(self.name, ".lock").resolve())

    def decide(self, force: bool = False) -> str:
        """`skip` (stamped with these parameters and inputs, outputs there), `fresh` (remove its outputs first:
        --force, or a training whose cut attempt had other parameters or inputs) or `run` (continue)."""
        self.reads = self.upstream()
        if not force and self.is_current():
            return "skip"
        if force or (STAGE[self.stage].continues and not self._matches(self.started)):
            self.redo_because = "--force" if force else "a new training"
            return "fresh"
        return "run"

    def start(self) -> None:
        """Record the attempt: not current until it finishes; a fresh one cleaned; a training told to continue."""
        self.stamp.unlink(missing_ok=True)
        if self.redo_because:
            self.clean(self.redo_because)
        if STAGE[self.stage].continues:  # continue only this very attempt, cut before it finished
            fold = self.run.fold(self.fold)  # the latest checkpoint, or the one before it if the latest is incomplete
            self.values["continue_training"] = any(fold.sidecar(k).is_file() for k in ("latest", "previous"))
        write_json(self.started, {"params": jsonable(self.values), "reads": self.reads})

    def finish(self, seconds: float) -> None:
        """Stamp the finished unit (atomically): parameters, input stamps, wall time."""
        write_json(self.stamp, {"stage": self.name, "params": jsonable(self.values), "reads": self.reads,
                                "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})

    def upstream(self) -> dict[str, str | None]:
        """The stamps this unit reads: its input stages (for a cross-validation every fold's model and validation)."""
        reads = STAGE[self.stage].reads
        names = [n.format(fold=self.fold) for n in reads]
        for k in self.values.get("crossval_folds", []):  # what each fold's own run read, and that run
            wanted = [n.format(fold=k) for n in reads] + ([unit_name(self.stage, k)] if k != self.fold else [])
            names += [n for n in wanted if n not in names]
        return {n: digest(self.run.stamp(n)) for n in names}

    def is_current(self) -> bool:
        """Stamped with these parameters and these input stamps, and its outputs are still there."""
        return self._matches(self.stamp) and self.outputs_there()

    def _matches(self, path: Path) -> bool:
        """`path` (a stamp or started record) has these parameters, leaving out how and where the unit runs,
        and these input stamps."""
        if not path.is_file():
            return False
        recorded = read_json(path)
        ignored = OPERATIONAL - STAGE[self.stage].compared_anyway
        same = {k: v for k, v in jsonable(self.values).items() if k not in ignored} == \
            {k: v for k, v in recorded["params"].items() if k not in ignored}
        return same and recorded["reads"] == self.reads

    def outputs_there(self) -> bool:
        """The files a finished unit leaves (with a cross-validation: the summary and every test-set case)."""
        paths = STAGE[self.stage].outputs(self.run, self.fold)
        if self.values.get("crossval_folds"):
            paths.append(self.run.crossval_stem().with_suffix(".json"))
            if self.values.get("predict_test"):
                paths += [self.run.test_ensemble.root / prediction_name(p) for p in self.run.raw.test_images()]
        return all(p.exists() for p in paths)

    def clean(self, why: str) -> None:
        """Remove the unit's outputs so it is redone from the start."""
        paths = STAGE[self.stage].removes(self.run, self.fold)
        paths += crossval_removes(self.run) if self.values.get("crossval_folds") else []
        for path in paths:
            if path.is_dir():
                # a reviewer's verdicts are not outputs of the stage: they outlive the predictions they judged
                verdicts = {f: f.read_bytes() for f in path.rglob(PredLayout(path).verdicts.name)}
                shutil.rmtree(path)
                for f, data in verdicts.items():
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(data)
            elif path.exists():
                path.unlink()
            else:
                continue
            print(f"   {why}: removed {path}", flush=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the unit, so processes running folds side by side take shared stages once, and a
        second run on the same folder waits for the unit (naming the process that holds it) instead of interleaving."""
        path = self.run.stamp(self.name, ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:  # not "w": the holder's name in it must survive a waiting process's open
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                print(f"   {self.name}: {holder} is running it; waiting for it", flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} ({' '.join(sys.argv)[:300]})")
            f.flush()
            try:
                self.end_leftovers()
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def end_leftovers(self) -> None:
        """End the processes a killed attempt left working for this unit (its lock is ours, so none is live)."""
        left = end_processes(tagged(TAG, self.tag))
        if left:
            print(f"   {self.name}: ended {len(left)} process(es) an earlier attempt left behind "
                  f"(pids {', '.join(str(p.pid) for p in left)})", flush=True)
