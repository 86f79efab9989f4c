"""The stage table: every pipeline stage in one row, read by params, stamps and run_all.py.

A stage is a notebook (`notebooks/<name>.ipynb`, its library module named after it) that runs once
per run or once per fold. Its row says which stages' stamps it reads (a fold stage reads the same
fold's: `{fold}`), what a finished run of it leaves in the run folder (`outputs`: all there, or it is
not finished) and what redoing it from scratch removes (`removes`). Adding a stage is one row here
and one notebook; run_all.py orders the rows as listed, shared stages before the first fold stage
first, then the fold stages fold after fold, then the shared stages after them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .layout import RunLayout

Paths = Callable[[RunLayout, "int | None"], "list[Path]"]


@dataclass(frozen=True)
class Stage:
    """One row of the table."""

    name: str  # notebook and stamp name, `NN_word`
    per_fold: bool  # run once per cross-validation fold (else once per run)
    reads: tuple[str, ...]  # units whose stamps it reads; `{fold}` is this unit's fold
    outputs: Paths  # what a finished run leaves
    removes: Paths  # what redoing it from scratch removes
    continues: bool = False  # a cut attempt continues (same parameters and inputs) rather than starting over
    multi_process: bool = False  # may run as several processes (torchrun): takes run_all's --nproc
    summarises_folds: bool = False  # with several folds, the last fold's run summarises them all
    compared_anyway: frozenset = field(default_factory=frozenset)  # operational keys that still make it stale

    @property
    def notebook(self) -> str:
        """The notebook's file name in notebooks/."""
        return f"{self.name}.ipynb"

    @property
    def word(self) -> str:
        """`convert` for `01_convert`: what --stages accepts beside the number and the full name."""
        return self.name[3:]


def _fold_outputs_train(run: RunLayout, fold: int | None) -> list[Path]:
    return [run.fold(fold).checkpoint("final"), run.fold(fold).sidecar("final")]


def _fold_removes_train(run: RunLayout, fold: int | None) -> list[Path]:
    f = run.fold(fold)
    return [f.train_log, f.progress, *f.all_checkpoints(), f.plans]


def _fold_removes_validate(run: RunLayout, fold: int | None) -> list[Path]:
    f = run.fold(fold)
    return [f.validation.root, f.validation_postprocessed.root, f.test_predictions.root, f.holdout.root,
            f.holdout_postprocessed.root]


TABLE: tuple[Stage, ...] = (
    Stage("01_convert", False, (), lambda run, _: [run.raw.dataset_json], lambda run, _: [run.raw.root]),
    Stage("02_plan", False, ("01_convert",), lambda run, _: [run.pre.plans, run.pre.splits],
          lambda run, _: [run.pre.plans, run.pre.splits, run.pre.fingerprint]),
    Stage("03_preprocess", False, ("02_plan",), lambda run, _: [run.pre.manifest], lambda run, _: [run.pre.store]),
    Stage("04_train", True, ("03_preprocess",), _fold_outputs_train, _fold_removes_train, continues=True,
          multi_process=True),
    Stage("05_validate", True, ("04_train_fold{fold}",), lambda run, fold: [run.fold(fold).validation.summary],
          _fold_removes_validate, summarises_folds=True),
    Stage("06_benchmark", False, ("03_preprocess",), lambda run, _: [run.benchmark_json],
          lambda run, _: [run.benchmark], compared_anyway=frozenset({"device"})),  # figures belong to their device
)
STAGE = {s.name: s for s in TABLE}


def run_order(stages: list[str], folds: list[int]) -> list[tuple[str, int | None]]:
    """(stage, fold) units in table order: leading shared stages, fold stages fold after fold, trailing shared ones."""
    rows = [s for s in TABLE if s.name in stages]
    first = next((i for i, s in enumerate(rows) if s.per_fold), len(rows))
    last = max((i for i, s in enumerate(rows) if s.per_fold), default=len(rows) - 1)
    order = [(s.name, None) for s in rows[:first]]
    order += [(s.name, k) for k in folds for s in rows[first:last + 1] if s.per_fold]
    order += [(s.name, None) for s in rows[first:last + 1] if not s.per_fold]  # shared ones between fold stages
    return order + [(s.name, None) for s in rows[last + 1:]]
