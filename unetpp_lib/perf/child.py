"""The GPU check's child processes: run one in its own process group, killed with it at a cap, and read the
one `RESULT {json}` line it prints. Used by the kit's compiled configurations (gpu_sections) and by the
original's side (vs_original).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_captured(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit code or None when killed at `timeout`, stdout + stderr) of a child in its own process group."""
    # its own process group (not session): killable as a whole, and still ended by whoever ends ours
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            process_group=0, env=env)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers, nothing else
        return None, proc.communicate()[0]
    except BaseException:  # SIGTERM (SystemExit) or Ctrl-C: take the child along
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def child_result(cmd: list[str], cap: float, env: dict | None = None, tail: int = 1500) -> dict:
    """The RESULT dict the child `cmd`, killed at `cap` seconds, printed, with `child_wall_s`; or why it has none
    (`skipped`), with the last `tail` characters of its output. Under 20 s, no child starts."""
    if cap < 20:
        return {"skipped": f"section time spent ({cap:.0f} s left)"}
    t0 = time.monotonic()
    rc, out = run_captured(cmd, cap, env=env)
    wall = round(time.monotonic() - t0, 1)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if rc == 0 and lines:
        return {**json.loads(lines[-1][7:]), "child_wall_s": wall}
    why = f"killed at its cap of {cap:.0f} s" if rc is None else f"exit code {rc}"
    return {"skipped": why, "child_wall_s": wall, "output_tail": out[-tail:]}
