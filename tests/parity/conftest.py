"""Parity suite: the original nnU-Net v1.6.4 (its own venv) and the kit on the same inputs.

`run_ref("ref_xxx.py", **args)` runs `tests/parity/ref/ref_xxx.py` with the reference
interpreter. Arguments go in as JSON (paths to .npy/.nii.gz/.json files the test wrote);
the script writes `result.json` and any arrays as `.npy` files into `args["out"]`.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from .reference_env import ensure

REF_DIR = Path(__file__).parent / "ref"


def pytest_collection_modifyitems(items):
    """Every test under tests/parity/ carries the `parity` marker."""
    for item in items:
        if "tests/parity/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.parity)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the reference's count (so both sum in the same order), and no intra-op
    hand-offs, which cost 10-50x on thousands of tiny tensor ops on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ref_python() -> Path:
    """The reference interpreter (nnunet==1.6.4), built on first use."""
    return ensure()


class RefResult(dict):
    """result.json of a reference run; `.array(name)` loads `<out>/<name>.npy`."""

    def __init__(self, data: dict, out: Path):
        super().__init__(data)
        self.out = out

    def array(self, name: str) -> np.ndarray:
        """An array the reference script saved with `save_array`."""
        return np.load(self.out / f"{name}.npy")


def ref_env(out: Path) -> dict:
    """The environment of a reference run: no kit venv variables, v1's folders under `out`, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(nnUNet_raw_data_base=str(out / "nnunet_raw"), nnUNet_preprocessed=str(out / "nnunet_pre"),
               RESULTS_FOLDER=str(out / "nnunet_results"), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def call_ref(ref_python: Path, script: str, out: Path, args: dict, timeout: float = 600) -> RefResult:
    """Run tests/parity/ref/<script> on `args` (paths as strings) with its results in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    args = {**{k: str(v) if isinstance(v, Path) else v for k, v in args.items()}, "out": str(out)}
    (out / "args.json").write_text(json.dumps(args, indent=2))
    res = subprocess.run([str(ref_python), str(REF_DIR / script), str(out / "args.json")], env=ref_env(out),
                         capture_output=True, text=True, timeout=timeout, cwd=str(out))
    if res.returncode:
        raise RuntimeError(f"reference script {script} failed ({res.returncode}):\n"
                           f"{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return RefResult(json.loads((out / "result.json").read_text()), out)


@pytest.fixture
def run_ref(ref_python, tmp_path):
    """Call a reference script: run_ref("ref_plan.py", key=value, ...) -> RefResult."""
    counter = iter(range(10_000))

    def run(script: str, timeout: float = 600, **args) -> RefResult:
        return call_ref(ref_python, script, tmp_path / f"ref_{Path(script).stem}_{next(counter)}", args, timeout)

    return run
