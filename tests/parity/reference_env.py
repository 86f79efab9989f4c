"""The original's own environment: nnU-Net v1.6.4 + batchgenerators in a venv of its own, made once.

Its pins (numpy < 2, batchgenerators 0.21) clash with the kit's, so the reference never
shares the kit's interpreter: parity tests drive it as a subprocess through files.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-nnunet-v1"
# batchgenerators 0.21 is the last release v1.6.4's imports work with (SlimDataLoaderBase,
# MultiThreadedAugmenter); torch 2.13.0 is the CPU build on disk, as in the kit's own venv.
PINS = ["torch==2.13.0", "nnunet==1.6.4", "batchgenerators==0.21", "numpy==1.26.4", "pandas==2.2.3",
        "scipy==1.17.1", "scikit-image==0.26.0", "SimpleITK==2.5.7", "matplotlib"]
STAMP = "pins.json"


def python_of(venv: Path = VENV) -> Path:
    """The venv's interpreter."""
    return venv / "bin" / "python"


def ensure(venv: Path = VENV) -> Path:
    """Create (or repair) the reference venv if its pins changed; return its python. Safe across processes."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".venv-nnunet-v1.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = venv / STAMP
        if stamp.is_file() and json.loads(stamp.read_text()) == PINS and python_of(venv).is_file():
            return python_of(venv)
        stamp.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        # nnunet 1.6.4 lists the deprecated `sklearn` package; its installer refuses without this flag
        env = {**os.environ, "SKLEARN_ALLOW_DEPRECATED_SKLEARN_PACKAGE_INSTALL": "True"}
        res = subprocess.run([str(python_of(venv)), "-m", "pip", "install", "-q", *PINS], env=env,
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"could not build the nnU-Net v1.6.4 reference venv in {venv}:\n"
                               f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        stamp.write_text(json.dumps(PINS))
    return python_of(venv)
