"""04_train's entry points: train a fold here or through torchrun (DDP), drawing progress.png every epoch.

`run(cfg, nproc)` trains in this process (nproc 1) or starts `torchrun --standalone` on this
module with `nproc` ranks; each rank runs `main` (`python -m unetpp_lib.launch CONFIG.json`,
also the command for several machines). A failure on any rank makes torchrun stop the others
(no process left behind, the port freed); `launch` names the rank's error from torchrun's output.
Part of the train stage: it imports the loop (train.py) and shared modules only.
"""
from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from dataclasses import asdict

from .io import read_json, write_json
from .layout import FoldLayout, RunLayout
from .plots import progress_png
from .train import TrainConfig, train


class TrainingFailed(RuntimeError):
    """A distributed training run ended with an error on some rank."""


def draw_progress(log: list[dict], fold: FoldLayout) -> None:
    """Redraw the fold's progress.png, so a long run can be watched (the Trainer's per-epoch callback)."""
    progress_png(log, fold.progress)


def failure_causes(output: str) -> list[str]:
    """The lines of torchrun's output where a rank names its exception (`[rank1]: RuntimeError: ...`)."""
    return [ln for ln in output.strip().splitlines()
            if re.match(r"\[rank\d+\]: \w*(Error|Exception|Interrupt)\b", ln)]


def launch(cfg: TrainConfig, nproc: int, timeout: float | None = None) -> list[dict]:
    """Train with `nproc` processes through torchrun (DDP); raises TrainingFailed naming the error."""
    fold = RunLayout(cfg.run_dir).fold(cfg.fold)
    fold.root.mkdir(parents=True, exist_ok=True)
    config_path = write_json(fold.train_config, asdict(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "unetpp_lib.launch", str(config_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun then stops its workers (they run in their own sessions)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise TrainingFailed(f"torchrun with {nproc} processes exceeded {timeout} s and was stopped with all "
                             f"its ranks") from None
    if proc.returncode:
        lines = (out + err).strip().splitlines()
        causes = failure_causes(out + err)
        raise TrainingFailed(f"torchrun with {nproc} processes failed (exit {proc.returncode}); all ranks were "
                             f"stopped. Cause: {'; '.join(causes) or 'see below'}\n" + "\n".join(lines[-15:]))
    return read_json(fold.train_log)["epochs"]


def run(cfg: TrainConfig, nproc: int = 1) -> list[dict]:
    """Train here (nproc 1) or with nproc DDP processes through torchrun; returns the epoch log."""
    return launch(cfg, nproc) if nproc > 1 else train(cfg, draw_progress)


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun: `python -m unetpp_lib.launch CONFIG.json` runs one rank."""
    ap = argparse.ArgumentParser(description="one rank of a UNet++ training run")
    ap.add_argument("config", help="train_config.json written by launch()")
    args = ap.parse_args(argv)
    train(TrainConfig(**read_json(args.config)), draw_progress)


if __name__ == "__main__":
    main()
