"""The fold loop of run_all.py: two folds, a cross-validation summary, the test-set ensemble, skip, force, resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_all_until
from unetpp_lib import validate
from unetpp_lib.evaluation import crossval
from unetpp_lib.core.params import parse_set

ROOT = Path(__file__).resolve().parents[1]
TINY = ["synth_num_training=4", "synth_num_test=1", "synth_shape=[12, 32, 32]", "num_workers=1",
        "synth_inplane_mm=[0.6, 0.9]", "synth_slice_mm=[0.7, 5.0]", "synth_holdout_cases=0",  # not the demo's
        "plan_overrides={batch_size: 2, base_num_features: 4}", "iterations_per_epoch=2", "val_iterations=1",
        "mirror_axes=[]"]
FOLD_STAGES = ["--stages", "convert", "plan", "preprocess", "train", "validate"]


def tiny_file(folder: Path, *overrides: str) -> str:
    """The demo params with TINY and `overrides` as a params file: it may hold keys of stages a run leaves out
    (a --set key must belong to a chosen stage)."""
    values = {**yaml.safe_load((ROOT / "params" / "demo.yaml").read_text()), **parse_set([*TINY, *overrides])}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def run_all(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A run with folds 0 and 1 trained for one epoch and validated."""
    root = tmp_path_factory.mktemp("folds")
    res = run_all(*FOLD_STAGES, "--folds", "0", "1", "--set", "run_dir=run", *TINY, "num_epochs=1", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run", res


@pytest.mark.notebooks
def test_fold_loop_writes_notebooks_per_fold_and_a_crossval_summary(two_folds):
    run, res = two_folds
    for name in ("01_convert", "02_plan", "03_preprocess", "04_train_fold0", "05_validate_fold0",
                 "04_train_fold1", "05_validate_fold1"):
        assert (run / "notebooks" / f"{name}.ipynb").is_file(), name
        assert json.loads((run / "stages" / f"{name}.json").read_text())["stage"] == name
    # fold after fold: fold 0 is validated before fold 1 trains
    order = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("== ") and "->" in line]
    assert order == ["01_convert", "02_plan", "03_preprocess", "04_train_fold0", "05_validate_fold0",
                     "04_train_fold1", "05_validate_fold1"]
    cv = json.loads((run / "crossval_summary.json").read_text())
    dice = [json.loads((run / f"fold_{k}" / "validation" / "summary.json").read_text())["results"]["mean"]["1"]["Dice"]
            for k in (0, 1)]
    assert cv["folds"] == [0, 1] and [cv["per_fold"][k]["1"]["Dice"] for k in ("0", "1")] == dice
    liver = cv["mean_sd_over_folds"]["1"]["Dice"]
    assert liver["mean"] == pytest.approx(np.mean(dice)) and liver["sd"] == pytest.approx(np.std(dice, ddof=1))
    assert cv["num_cases"] == 2 and cv["labels"] == {"1": "liver", "2": "tumour"}
    assert (run / "crossval_summary.csv").read_text().splitlines()[0].startswith("fold,liver Dice")
    assert (run / "crossval_summary_postprocessed.json").is_file() and (run / "qa" / "crossval.png").is_file()
    summary = res.stdout[res.stdout.index("== summary"):]  # run_all's closing summary: per fold and mean +- sd
    assert any(ln.split()[:2] == ["1", f"{dice[1]:.4f}"] for ln in summary.splitlines())
    mean_row = next(ln for ln in summary.splitlines() if ln.strip().startswith("mean +- sd"))
    assert mean_row.split()[3:6] == [f"{np.mean(dice):.4f}", "+-", f"{np.std(dice, ddof=1):.4f}"]
    assert "run/crossval_summary.json" in summary
    assert not any((run / f"fold_{k}" / "test_predictions").exists() for k in (0, 1))  # the ensemble instead
    ensemble = sorted((run / "test_ensemble").glob("*.nii.gz"))
    assert len(ensemble) == 1 and not list((run / "test_ensemble" / "raw").glob("*.nii.gz"))
    settings = json.loads((run / "test_ensemble" / "settings.json").read_text())
    assert settings.get("key", settings)["folds"] == [0, 1]  # currency.renew keeps them under "key"
    # 05's uncertainty (save_uncertainty on by default): per fold, pooled over the folds, and the ensemble's maps
    folds = [json.loads((run / f"fold_{k}" / "validation" / "summary.json").read_text())["uncertainty"]
             for k in (0, 1)]
    pooled = cv["uncertainty"]["all_cases"]
    assert pooled["error_detection"]["wrong_voxels"] == sum(f["error_detection"]["wrong_voxels"] for f in folds)
    assert [r["case"] for r in pooled["per_case"]] == [r["case"] for f in folds for r in f["per_case"]]
    assert (run / "qa" / "crossval_uncertainty.png").is_file()
    case = ensemble[0].name[:-len(".nii.gz")]
    assert all((run / "test_ensemble" / "uncertainty" / f"{case}_{k}.nii.gz").is_file()
               for k in ("entropy", "spread", "confidence"))


@pytest.mark.notebooks
def test_second_run_skips_current_stages_and_force_redoes_one(two_folds):
    run, _ = two_folds
    final = run / "fold_0" / "checkpoint_final.pt"
    before = final.stat().st_mtime_ns
    res = run_all(*FOLD_STAGES, "--folds", "0", "1", "--set", f"run_dir={run}", *TINY, "num_epochs=1", cwd=run.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("is complete and current") == 7 and "->" not in res.stdout
    assert final.stat().st_mtime_ns == before
    summary = run / "fold_1" / "validation" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    res = run_all("--stages", "validate", "--folds", "1", "--force", "--params", tiny_file(run.parent, "num_epochs=1"),
                  "--set", f"run_dir={run}", cwd=run.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--force: removed" in res.stdout and summary.stat().st_mtime_ns != stamp
    assert final.stat().st_mtime_ns == before  # only the chosen stage


@pytest.mark.notebooks
def test_changed_parameters_make_a_stage_and_its_dependents_stale(two_folds, tmp_path):
    run = Path(shutil.copytree(two_folds[0], tmp_path / "run"))
    params = tiny_file(tmp_path, "plan_overrides={batch_size: 2, base_num_features: 6}", "num_epochs=1")
    res = run_all("--stages", "plan", "preprocess", "train", "--params", params, "--set", f"run_dir={run}",
                  cwd=run.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "== 02_plan ->" in res.stdout and "== 03_preprocess ->" in res.stdout  # plan changed, so its reader too
    assert "01_convert" not in res.stdout  # not chosen
    # the old model is not "continued" under the new plan: the fold trains from the start
    assert "== 04_train_fold0 ->" in res.stdout and "continuing" not in res.stdout
    assert "a new training: removed" in res.stdout
    side = json.loads((run / "fold_0" / "checkpoint_final.json").read_text())
    assert side["network"]["base_features"] == 6 and side["epoch"] == 1


@pytest.mark.notebooks
@pytest.mark.slow
def test_killed_run_continues_where_it_stopped(tmp_path):
    args = [*FOLD_STAGES, "--set", "run_dir=run", *TINY, "num_epochs=40", "save_every=1"]
    latest = tmp_path / "run" / "fold_0" / "checkpoint_latest.json"
    proc = run_all_until(args, tmp_path, latest)
    os.killpg(proc.pid, signal.SIGKILL)  # the kernel, in a session of its own, ends with run_all (test_run_all.py)
    proc.wait()
    assert latest.is_file()
    stopped_at = json.loads(latest.read_text())["epoch"]
    assert 1 <= stopped_at < 40 and not (tmp_path / "run" / "stages" / "04_train_fold0.json").exists()
    first_epochs = json.loads((tmp_path / "run" / "fold_0" / "train_log.json").read_text())["epochs"][:stopped_at]
    res = run_all(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("is complete and current") == 3  # convert, plan, preprocess
    assert "04_train_fold0 -> " in res.stdout and "continuing from checkpoint_latest" in res.stdout
    log = json.loads((tmp_path / "run" / "fold_0" / "train_log.json").read_text())["epochs"]
    assert len(log) == 40 and log[:stopped_at] == first_epochs  # the epochs before the kill are kept, not redone
    assert (tmp_path / "run" / "fold_0" / "validation" / "summary.json").is_file()


@pytest.mark.notebooks
def test_ensemble_probabilities_are_the_mean_of_the_folds(two_folds, tmp_path):
    from unetpp_lib.nn.infer import InferenceSettings, predict

    run, _ = two_folds
    image = sorted((run / "raw" / "imagesTs").glob("*_0000.nii.gz"))[:1]
    npz = image[0].name.replace("_0000.nii.gz", ".npz")
    probs = []
    for name, folds in (("a", [0]), ("b", [1]), ("ab", [0, 1])):
        predict(image, [run / f"fold_{k}" for k in folds], tmp_path / name,
                InferenceSettings(device="cpu", mirror_axes=(), save_probabilities=True))
        probs.append(np.load(tmp_path / name / npz)["probabilities"].astype(np.float32))
    a, b, ab = probs
    assert np.abs(a - b).max() > 0.01  # two different models
    assert np.allclose(ab, (a + b) / 2, atol=2e-3)  # float16 storage


def test_crossval_summary_on_known_fold_results(tmp_path):
    def case(liver, tumour):
        return {"1": {m: liver for m in crossval.CV_METRICS}, "2": {m: tumour for m in crossval.CV_METRICS}}
    folds = {0: [case(0.9, 0.5), case(0.7, float("nan"))], 1: [case(0.8, 0.3)], 2: [case(0.6, 0.1)]}
    for k, cases in folds.items():
        summary = validate.summary_json(cases, [1, 2], f"fold {k}")
        (tmp_path / f"fold_{k}" / "validation").mkdir(parents=True)
        (tmp_path / f"fold_{k}" / "validation" / "summary.json").write_text(json.dumps(summary))
    cv = crossval.crossval_summary(tmp_path, [0, 1, 2])
    assert cv["per_fold"]["0"]["1"]["Dice"] == pytest.approx(0.8)
    assert cv["per_fold"]["0"]["2"]["Dice"] == pytest.approx(0.5)  # a case without tumour (NaN) does not count
    assert cv["mean_sd_over_folds"]["1"]["Dice"]["mean"] == pytest.approx(0.7333333)
    assert cv["mean_sd_over_folds"]["1"]["Dice"]["sd"] == pytest.approx(np.std([0.8, 0.8, 0.6], ddof=1))
    assert cv["mean_over_all_cases"]["1"]["Dice"] == pytest.approx(0.75)  # 4 cases pooled
    assert cv["mean_over_all_cases"]["2"]["Dice"] == pytest.approx(0.3)
    rows = crossval.crossval_table(cv)
    assert [r["fold"] for r in rows] == ["0", "1", "2", "mean +- sd", "all cases"]
    assert rows[3]["liver Dice"].startswith("0.7333 +- 0.1155")
    with pytest.raises(FileNotFoundError, match="fold 3 has no .*run 05_validate for fold 3"):
        crossval.crossval_summary(tmp_path, [0, 3])


def test_a_second_run_on_the_same_folder_waits_names_the_first_and_skips_its_work(tmp_path):
    """Two run_all.py on one run_dir (a second terminal, a scheduler's retry): the second waits for each unit the
    first holds, naming its process, then skips what the first finished; nothing is done twice."""
    args = [sys.executable, str(ROOT / "run_all.py"), "--stages", "convert", "plan", "preprocess", "train",
            "--params", tiny_file(tmp_path, "num_epochs=8"), "--set", "run_dir=run"]
    log = tmp_path / "run" / "fold_0" / "train_log.json"
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not log.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert log.is_file(), "the first run's training did not start"
        second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        out_first = first.communicate(timeout=600)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    waited = f"04_train_fold0: process {first.pid} ("
    assert waited in second.stdout and "run_all.py" in second.stdout.split(waited)[1].splitlines()[0]
    for unit in ("01_convert", "02_plan", "03_preprocess", "04_train_fold0"):
        assert f"== {unit} is complete and current" in second.stdout, unit
        assert f"== {unit} done in" in out_first, unit
    epochs = json.loads(log.read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(8))  # one training, its log not interleaved with another
