"""Nothing lost, whatever happens: a run killed (SIGKILL of its process group) at random moments in every stage and
started again each time ends exactly as a run never interrupted."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from unetpp_lib.core import io

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("CHAOS_SEED", "20261203"))  # printed on failure; set CHAOS_SEED to replay other moments
UNITS = ["01_convert", "02_plan", "03_preprocess", "04_train_fold0", "05_validate_fold0", "06_benchmark"]
PARAMS = {"synth_num_training": 4, "synth_num_test": 1, "synth_shape": [12, 32, 32], "num_workers": 1,
          "plan_overrides": {"batch_size": 2, "base_num_features": 4}, "iterations_per_epoch": 2, "val_iterations": 1,
          "num_epochs": 8, "save_every": 1, "mirror_axes": [], "precision": "fp32", "channels_last": False,
          "bench_precisions": ["fp32"], "bench_warmup": 0, "bench_steps": 1, "bench_profile_steps": 0,
          "bench_inference_shape": [12, 32, 32], "bench_head_modes": ["deepest"]}
# written with the time or the speed of the run, not what it computed
VOLATILE = {"seconds", "finished", "saved", "when", "peak_rss_mb", "time_s", "timings", "started", "date",
            "epoch_seconds", "samples_per_s", "model_saved", "timestamp", "id",
            "inputs"}  # inputs: (path, mtime, size) of each run's own synthetic files, made at other times


def start(root: Path, log: Path) -> subprocess.Popen:
    """The whole pipeline for fold 0, its output to `log`, in a process group of its own."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), "--params", str(root.parent / "p.yaml"),
                                 "--set", f"run_dir={root}"], cwd=root.parent, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stage_times(log: Path) -> dict[str, float]:
    """Seconds each unit took in a finished run, from its `== unit done in` lines."""
    return {ln.split()[1]: float(ln.split()[4]) for ln in log.read_text().splitlines()
            if ln.startswith("== ") and " done in " in ln and ln.split()[5] == "s"}


def next_wanted(log: Path, proc: subprocess.Popen, wanted, timeout: float = 600) -> str | None:
    """The first unit this attempt starts that still wants a kill (as soon as it starts), or None if it ends."""
    deadline, seen = time.time() + timeout, 0
    while time.time() < deadline:
        starts = [ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("== ") and " -> " in ln]
        for unit in starts[seen:]:
            if wanted(unit):
                return unit
        seen = len(starts)
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    raise TimeoutError(f"no unit started in {timeout} s")


def running(log: Path) -> str | None:
    """The unit a run is in now: the last one started and not done (None between units)."""
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("== ")]
    if lines and lines[-1].endswith(".ipynb") and " -> " in lines[-1]:
        return lines[-1].split()[1]
    return None


def strip(obj):
    """JSON with the volatile keys left out, recursively."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    if isinstance(obj, str):  # each run's own folder
        return obj.replace("/ref/", "/RUN/").replace("/chaos/", "/RUN/")
    return obj


def compare_tree(ref: Path, got: Path, sub: str, why: str) -> None:
    """Every file under `sub`: the same names; bytes equal (JSON: equal without the volatile keys)."""
    a, b = ref / sub, got / sub
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()), f"{sub}: {why}"
    for name in names:
        if Path(name).name == "timings.json":  # seconds per case: how fast, not what
            continue
        x, y = a / name, b / name
        if name.endswith(".json"):
            assert strip(json.loads(x.read_text())) == strip(json.loads(y.read_text())), f"{sub}/{name}: {why}"
        elif name.endswith(".nii.gz"):
            (va, ga), (vb, gb) = io.read_image(x), io.read_image(y)
            assert np.array_equal(va, vb) and ga == gb, f"{sub}/{name}: {why}"
        else:
            assert x.read_bytes() == y.read_bytes(), f"{sub}/{name}: {why}"


@pytest.mark.slow
def test_a_run_killed_in_every_stage_ends_as_an_uninterrupted_one(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(PARAMS))
    ref, chaos = tmp_path / "ref", tmp_path / "chaos"
    proc = start(ref, tmp_path / "ref.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    took = stage_times(tmp_path / "ref.log")
    assert set(took) == set(UNITS)
    rng = random.Random(SEED)
    kills, attempt = [], 0
    # each attempt is killed inside the first stage that has no kill yet, at a random moment of its duration in the
    # uninterrupted run (then two more anywhere); a kill counts for the stage it actually hit
    wanted = {u: 3 if u == "04_train_fold0" else 1 for u in UNITS}  # 8 kills: the long training takes three
    while len(kills) < 8 and attempt < 24:
        attempt += 1
        log = tmp_path / f"chaos_{attempt}.log"
        proc = start(chaos, log)
        unit = next_wanted(log, proc, lambda u: sum(k == u for k, _ in kills) < wanted[u])
        if unit is None:  # the run ended with nothing left to kill
            break
        after = rng.uniform(0.05, 0.5) * max(took[unit], 0.5)  # a random moment in the first half of the stage
        time.sleep(after)
        hit = running(log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if hit:
            kills.append((hit, round(after, 2)))
    log = tmp_path / "chaos_last.log"
    proc = start(chaos, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    why = f"differs after kills {kills} (CHAOS_SEED={SEED})"
    assert len(kills) >= 8 and {u for u, _ in kills} == set(UNITS), why
    print(f"chaos: seed {SEED}, kills (unit, seconds into it): {kills}")
    for sub in ("raw", "preprocessed", "fold_0/validation", "fold_0/validation_postprocessed",
                "fold_0/test_predictions"):
        compare_tree(ref, chaos, sub, why)
    for kind in ("final", "best"):
        a = torch.load(ref / "fold_0" / f"checkpoint_{kind}.pt", weights_only=True)
        b = torch.load(chaos / "fold_0" / f"checkpoint_{kind}.pt", weights_only=True)
        assert a["epoch"] == b["epoch"], why
        for part in ("model", "optimizer", "scaler"):
            assert repr(a[part].keys()) == repr(b[part].keys()), why
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), f"{kind} weights {why}"
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa), why
        assert a["best_ema"] == b["best_ema"] and torch.equal(a["rng_torch"], b["rng_torch"]), why
        assert torch.equal(a["rng_augment"], b["rng_augment"]), why
    log_a = strip(json.loads((ref / "fold_0" / "train_log.json").read_text()))
    log_b = strip(json.loads((chaos / "fold_0" / "train_log.json").read_text()))
    assert log_a["epochs"] == log_b["epochs"], why
