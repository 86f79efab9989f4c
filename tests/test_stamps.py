"""Skip, continue or redo: Unit.decide on a run folder made by hand (run_all's whole loop: test_folds.py)."""
import os
import subprocess
import sys
import time

from unetpp_lib.core.layout import RunLayout
from unetpp_lib.core.stamps import TAG, Unit


def finished(run: RunLayout, stage: str, fold, values: dict) -> Unit:
    """A unit that ran to the end: its outputs written, its stamp recorded."""
    unit = Unit(run, stage, fold, dict(values))
    assert unit.decide() != "skip"
    unit.start()
    for path in {"01_convert": [run.raw.dataset_json], "02_plan": [run.pre.plans, run.pre.splits]}.get(stage, []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    unit.finish(1.0)
    return unit


def test_a_finished_unit_is_skipped_until_its_parameters_inputs_or_outputs_change(tmp_path):
    run = RunLayout(tmp_path)
    convert = {"run_dir": str(tmp_path), "seed": 0, "num_workers": 2}
    finished(run, "01_convert", None, convert)
    plan = finished(run, "02_plan", None, {"run_dir": str(tmp_path), "planner": "nnunet_v1"})
    assert Unit(run, "02_plan", None, dict(plan.values)).decide() == "skip"
    assert Unit(run, "02_plan", None, {**plan.values, "planner": "unetpp"}).decide() == "run"
    assert Unit(run, "01_convert", None, {**convert, "num_workers": 8}).decide() == "skip"  # operational
    force = Unit(run, "02_plan", None, dict(plan.values))
    assert force.decide(force=True) == "fresh" and force.redo_because == "--force"
    finished(run, "01_convert", None, {**convert, "seed": 1})  # a new input stamp: its readers are stale
    assert Unit(run, "02_plan", None, dict(plan.values)).decide() == "run"
    finished(run, "02_plan", None, plan.values)
    run.pre.splits.unlink()
    assert Unit(run, "02_plan", None, dict(plan.values)).decide() == "run"  # an output is gone


def test_a_training_continues_only_the_attempt_with_the_same_parameters(tmp_path):
    run = RunLayout(tmp_path)
    values = {"run_dir": str(tmp_path), "fold": 0, "num_epochs": 4, "continue_training": False}
    first = Unit(run, "04_train", 0, dict(values))
    assert first.decide() == "fresh" and first.redo_because == "a new training"  # nothing started yet
    first.start()
    assert first.values["continue_training"] is False  # no latest checkpoint to continue from
    again = Unit(run, "04_train", 0, dict(values))
    assert again.decide() == "run"  # the cut attempt had these parameters: continue it
    assert Unit(run, "04_train", 0, {**values, "num_epochs": 5}).decide() == "fresh"
    assert Unit(run, "04_train", 0, {**values, "nproc": 2}).decide() == "run"  # operational


def test_the_lock_holder_ends_what_a_killed_attempt_of_its_unit_left(tmp_path):
    run = RunLayout(tmp_path)
    unit, other = Unit(run, "04_train", 0, {}), Unit(run, "04_train", 1, {})
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    left = subprocess.Popen(sleep, env={**os.environ, TAG: unit.tag})  # as a kernel's worker outliving its run
    beside = subprocess.Popen(sleep, env={**os.environ, TAG: other.tag})  # another fold, running side by side
    try:
        time.sleep(0.5)
        with unit.lock():
            assert left.wait(timeout=10) is not None
        assert beside.poll() is None
    finally:
        for proc in (left, beside):
            proc.kill()
            proc.wait()


def test_redoing_a_validation_keeps_the_reviewers_verdicts(tmp_path):
    from unetpp_lib.core.layout import RunLayout
    from unetpp_lib.core.stamps import Unit

    run = RunLayout(tmp_path / "run")
    val = run.fold(0).validation
    val.root.mkdir(parents=True)
    (val.root / "liver_3.nii.gz").write_bytes(b"prediction")
    val.verdicts.write_text("case,verdict,note\nliver_3,fix,rim missed\n")
    Unit(run, "05_validate", 0, {}).clean("--force")
    assert not (val.root / "liver_3.nii.gz").exists()
    assert val.verdicts.read_text() == "case,verdict,note\nliver_3,fix,rim missed\n"
