"""Helpers for the reference scripts, which run in the nnU-Net v1.6.4 venv (not the kit's)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

# The fork's UNet++ rebuilt from v1's blocks lives with the GPU check's side-by-side run (unetpp_lib/perf/v1/),
# which runs it in v1's interpreter too; the reference scripts import it from there.
sys.path.insert(1, str(Path(__file__).resolve().parents[3] / "unetpp_lib" / "perf" / "v1"))
import v1_side  # noqa: E402

cpu_only = v1_side.cpu_only  # v1 calls .cuda() unconditionally: made a no-op on a CPU-only machine


def args() -> dict:
    """The arguments the test wrote (argv[1] is args.json); makes nnU-Net's folders exist."""
    a = json.loads(Path(sys.argv[1]).read_text())
    for key in ("nnUNet_raw_data_base", "nnUNet_preprocessed", "RESULTS_FOLDER"):
        os.makedirs(os.environ[key], exist_ok=True)
    return a


def to_jsonable(x):
    """numpy scalars/arrays and tuples as plain JSON values."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_array(a: dict, name: str, arr) -> None:
    """One array as <out>/<name>.npy for the test to load."""
    np.save(Path(a["out"]) / f"{name}.npy", np.asarray(arr))


def done(a: dict, result: dict) -> None:
    """Write result.json (the test reads it)."""
    (Path(a["out"]) / "result.json").write_text(json.dumps(to_jsonable(result), indent=2))
