"""Notebooks run headless through papermill and through run_all.py, with tiny parameters."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mean_dice_by_hand

ROOT = Path(__file__).resolve().parents[1]
TINY = ["synth_num_training=3", "synth_num_test=1", "synth_shape=[12, 32, 32]", "num_workers=1",
        "synth_inplane_mm=[0.6, 0.9]", "synth_slice_mm=[0.7, 5.0]", "synth_holdout_cases=0"]  # not the demo's

pytestmark = pytest.mark.notebooks


def run_all(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def outputs(nb: Path) -> list[dict]:
    return [o for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def test_01_convert_under_papermill_with_injected_parameters(tmp_path):
    import papermill

    out = tmp_path / "01_convert.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "01_convert.ipynb"), str(out), kernel_name="python3",
                               cwd=str(ROOT / "notebooks"), progress_bar=False,
                               parameters={"run_dir": str(tmp_path / "run"), "synth_num_training": 3,
                                           "synth_num_test": 1, "synth_shape": [12, 32, 32], "seed": 3,
                                           "headless": True, "viewer": "png", "show_case": "liver_1"})
    cells = json.loads(out.read_text())["cells"]
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in cells)
    ds = json.loads((tmp_path / "run" / "raw" / "dataset.json").read_text())
    assert ds["numTraining"] == 3 and ds["numTest"] == 1
    assert json.loads((tmp_path / "run" / "msd" / "synthetic.json").read_text())["key"]["seed"] == 3
    kinds = {k for o in outputs(out) for k in o.get("data", {})}
    assert {"text/html", "image/png"} <= kinds  # the case table and the pictures
    assert (tmp_path / "run" / "qa" / "01_liver_1.png").is_file()


def test_run_all_runs_stages_into_the_run_folder(tmp_path):
    source = (ROOT / "notebooks" / "01_convert.ipynb").read_text()
    res = run_all("--set", "run_dir=run", *TINY, "plan_overrides={batch_size: 3, base_num_features: 4}",
                  "num_epochs=2", "iterations_per_epoch=2", "val_iterations=1", "mirror_axes=[]",
                  "bench_steps=1", "bench_warmup=1", "bench_inference_shape=[12, 32, 32]", "synth_holdout_cases=1",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    for stage in ("01_convert", "02_plan", "03_preprocess", "04_train_fold0", "05_validate_fold0", "06_benchmark"):
        executed = run / "notebooks" / f"{stage}.ipynb"
        assert executed.is_file() and outputs(executed), stage
    assert (run / "raw" / "dataset.json").is_file()
    plans = json.loads((run / "preprocessed" / "plans.json").read_text())
    assert plans["batch_size"] == 3 and plans["overrides"]["batch_size"]["used"] == 3
    manifest = json.loads((run / "preprocessed" / "3d_fullres" / "manifest.json").read_text())
    assert manifest["num_cases"] == 3 and manifest["plans_hash"] == plans["preprocessing_hash"]
    assert len(json.loads((run / "preprocessed" / "splits.json").read_text())) == 3  # one fold per case below 5
    assert {"02_fingerprint.png", "03_liver_0.png"} <= {p.name for p in (run / "qa").iterdir()}
    log = json.loads((run / "fold_0" / "train_log.json").read_text())["epochs"]
    assert len(log) == 2 and (run / "fold_0" / "checkpoint_final.pt").is_file()
    assert any("image/png" in o.get("data", {}) for o in outputs(run / "notebooks" / "04_train_fold0.ipynb"))
    summary = json.loads((run / "fold_0" / "validation" / "summary.json").read_text())
    # the mean liver Dice is the one recomputed from the written predictions and labels
    assert summary["results"]["mean"]["1"]["Dice"] == pytest.approx(mean_dice_by_hand(summary, 1), abs=1e-9)
    assert (run / "fold_0" / "progress.png").is_file()  # drawn by the launcher's per-epoch callback
    assert (run / "fold_0" / "validation" / "gallery.png").is_file()
    assert len(list((run / "fold_0" / "test_predictions").glob("*.nii.gz"))) == 1
    held = json.loads((run / "fold_0" / "holdout" / "summary.json").read_text())  # the longer held-out scan
    assert len(held["results"]["all"]) == 1 and "Invented Volume %" in held["results"]["mean"]["1"]
    assert "0 held-out longer scans" in res.stdout
    bench = json.loads((run / "benchmark" / "benchmark.json").read_text())
    assert bench["training"][0]["samples_per_s"] > 0 and (run / "benchmark" / "benchmark.png").is_file()
    echo = (run / "params.yaml").read_text()
    assert "synth_num_training: 3" in echo and "headless: true" in echo
    assert (ROOT / "notebooks" / "01_convert.ipynb").read_text() == source  # sources never written over


def test_run_all_failing_stage_names_notebook_and_error(tmp_path):
    res = run_all("--stages", "01", "--set", f"run_dir={tmp_path / 'run'}", f"msd_dir={tmp_path / 'nowhere'}")
    assert res.returncode == 1
    assert "stage 01_convert failed" in res.stderr and "DatasetError" in res.stderr
    assert "task folder not found" in res.stderr and str(tmp_path / "run" / "notebooks" / "01_convert.ipynb") in res.stderr


def test_run_all_rejects_bad_parameters_before_running(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"run_dir: {tmp_path / 'run'}\nnum_wrokers: 2\n")
    res = run_all("--params", str(bad))
    assert res.returncode == 2 and str(bad) in res.stderr and "num_wrokers" in res.stderr
    assert not (tmp_path / "run").exists()
    res = run_all("--stages", "nope", "--set", f"run_dir={tmp_path / 'run2'}")
    assert res.returncode != 0 and "unknown or missing stage 'nope'" in res.stderr
    assert not (tmp_path / "run2").exists()
