"""Shared fixtures: one tiny synthetic MSD task per session, copied where a test breaks it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from unetpp_lib.prep.synthetic import make_msd_task

ROOT = Path(__file__).resolve().parents[1]
# autotune's probe cache (~/.cache/unetpp-liver-kit) of the tests' own: kernels, workers and torchrun inherit it
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="unetpp-test-cache-")
# and inductor's compiled kernels of their own: a kernel cached by a run under other CPU caps (ATEN_CPU_CAPABILITY,
# ONEDNN_MAX_CPU_ISA) aborted the compiled-forward test when loaded without them
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="unetpp-test-inductor-")
TINY = dict(num_training=5, num_test=2, shape=(16, 40, 40), seed=7, quirks=True)


@pytest.fixture(scope="session")
def synth_task(tmp_path_factory) -> Path:
    """A tiny synthetic Task03-style folder (read-only for tests; copy it to modify)."""
    return make_msd_task(tmp_path_factory.mktemp("msd") / "Task03_Liver", **TINY)


@pytest.fixture
def task_copy(synth_task, tmp_path) -> Path:
    """A private copy of the synthetic task that a test may break."""
    return Path(shutil.copytree(synth_task, tmp_path / "Task03_Liver"))


def prepared_run(root: Path, synth_task: Path, overrides: dict) -> Path:
    """A run folder with the tiny task converted, planned (with `overrides`) and preprocessed."""
    from unetpp_lib import convert, plan, preprocess

    run = root / "run"
    convert.convert_task(synth_task, run / "raw")
    plan.plan_task(run / "raw", run / "preprocessed", overrides=overrides)
    preprocess.preprocess_task(run / "raw", run / "preprocessed")
    return run


def parity_outcomes(stats: dict) -> dict[str, int]:
    """Per parity test (not per phase): failed if any phase failed or errored (a reference venv that could not be
    built is a failure, not a silence), else skipped if skipped, else passed if its call passed."""
    seen: dict[str, str] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    for key, reports in stats.items():
        outcome = {"passed": "passed", "failed": "failed", "error": "failed", "skipped": "skipped"}.get(key)
        for r in reports:
            if outcome is None or "parity" not in getattr(r, "keywords", {}):
                continue
            if outcome == "passed" and getattr(r, "when", "call") != "call":
                continue  # a passing setup or teardown says nothing about the test
            node = getattr(r, "nodeid", id(r))
            if rank[outcome] >= rank[seen.get(node, "passed")] or node not in seen:
                seen[node] = outcome
    return {o: sum(1 for v in seen.values() if v == o) for o in ("passed", "failed", "skipped")}


def pytest_terminal_summary(terminalreporter):
    """One line saying how many parity tests (the original nnU-Net v1.6.4 beside the kit) ran and passed."""
    outcome = parity_outcomes(terminalreporter.stats)
    if any(outcome.values()):
        terminalreporter.write_line(f"parity with nnU-Net v1.6.4: {outcome['passed']} passed, "
                                    f"{outcome['failed']} failed (errors in setup included), "
                                    f"{outcome['skipped']} skipped")


def dice_by_hand(prediction: Path, reference: Path, label: int) -> float:
    """Dice of one label between a written prediction and its reference file (NaN when both lack it)."""
    import nibabel as nib
    import numpy as np

    test = np.asarray(nib.load(str(prediction)).dataobj) == label
    ref = np.asarray(nib.load(str(reference)).dataobj) == label
    denom = test.sum() + ref.sum()
    return float("nan") if denom == 0 else 2.0 * (test & ref).sum() / denom


def mean_dice_by_hand(summary: dict, label: int) -> float:
    """Mean over the summary's cases of Dice recomputed from the files it names (NaNs left out, as v1)."""
    import numpy as np

    return float(np.nanmean([dice_by_hand(Path(c["test"]), Path(c["reference"]), label)
                             for c in summary["results"]["all"]]))


def run_all_until(args: list[str], cwd: Path, path: Path, timeout: float = 300) -> subprocess.Popen:
    """run_all.py with `args`, in a session of its own (os.killpg ends it), returned once `path` exists,
    the run ended or `timeout` passed (the caller asserts which)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not path.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    return proc


def shifted_tumour(ref, by: int):
    """A prediction: the reference with its tumour moved `by` voxels along x (liver where it was)."""
    import numpy as np

    pred = np.where(ref == 2, 1, ref).astype(np.uint8)
    tumour = np.roll(ref == 2, by, axis=2)
    pred[tumour & (ref > 0)] = 2
    return pred


def review_run(root: Path, synth_task: Path) -> tuple:
    """A run with raw data, a fold 0 of three validation cases predicted by hand, scored with lesions; (run, cases)."""
    import numpy as np

    from unetpp_lib import convert, validate
    from unetpp_lib.core import io

    run = root / "run"
    convert.convert_task(synth_task, run / "raw")
    cases = sorted(p.name[: -len(".nii.gz")] for p in (run / "raw" / "labelsTr").glob("*.nii.gz"))
    val = cases[:3]
    io.write_json(run / "preprocessed" / "splits.json", [{"train": cases[3:], "val": val}])
    out = run / "fold_0" / "validation"
    for i, c in enumerate(val):
        ref, geom = io.read_image(run / "raw" / "labelsTr" / f"{c}.nii.gz")
        ref = ref.astype(np.uint8)
        pred = ref.copy() if i == 0 else shifted_tumour(ref, i)  # case 0 perfect, 1 and 2 worse and worse
        io.write_image(out / f"{c}.nii.gz", pred, geom)
    validate.score_folder(out, run / "raw", val, [0, 1, 2], "review test", lesions=True)
    return run, val
