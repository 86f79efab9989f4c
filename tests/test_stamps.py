"""Skip, continue or redo: Unit.decide on a run folder made by hand (run_all's whole loop: test_folds.py)."""
from unetpp_lib.layout import RunLayout
from unetpp_lib.stamps import Unit


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
