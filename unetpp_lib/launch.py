"""04_train's entry points: train a fold here or through torchrun (DDP), one line per epoch, progress.png at most every 30 s.

`run(cfg, nproc)` trains in this process (nproc 1) or starts torchrun (`--standalone`, through
`torchrun()`, which ends when its parent does) on this module with `nproc` ranks; each rank runs
`main` (`python -m unetpp_lib.launch CONFIG.json`, also the command for several machines) and ends
itself and its loader workers when torchrun is gone, SIGKILL included. A failure on any rank makes
torchrun stop the others (no process left behind, the port freed); `launch` names the rank's error
from torchrun's output and passes rank 0's epoch lines (`EpochReport`) on as they come. Part of the
train stage: it imports the loop (train.py) and shared modules only.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import torch

from .nn import autotune
from .core.device import resolve_device
from .core.io import read_json, write_json
from .core.labels import shown_name
from .core.layout import FoldLayout, RunLayout
from .core.lifetime import watch_parent
from .core.terminal import duration
from .qa.plots import progress_png
from .train import TrainConfig, train

TORCHRUN = "import sys; from unetpp_lib.launch import torchrun; torchrun(sys.argv[1:])"  # launch() runs it


class TrainingFailed(RuntimeError):
    """A distributed training run ended with an error on some rank."""


def epoch_line(entry: dict, num_epochs: int, names: list[str], seconds: float, left: float) -> str:
    """`epoch 12/60  train loss -0.412  val loss -0.398  pseudo-Dice liver 0.912 tumour 0.512  7.1 s/epoch  ...`."""
    dice = "  ".join(f"{n} {d:.3f}" for n, d in zip(names, entry["pseudo_dice"]))
    return (f"epoch {entry['epoch'] + 1}/{num_epochs}  train loss {entry['train_loss']:.4f}  "
            f"val loss {entry['val_loss']:.4f}  pseudo-Dice {dice}  {seconds:.1f} s/epoch  "
            f"time left {duration(left)}")


def class_names(run_dir: str, count: int) -> list[str]:
    """Names of the foreground classes as the kit shows them (core/labels.py), from the run's dataset.json."""
    path = RunLayout(run_dir).raw.dataset_json
    labels = read_json(path).get("labels", {}) if path.is_file() else {}
    return [shown_name(k, labels.get(str(k))) for k in range(1, count + 1)]


class EpochReport:
    """The Trainer's per-epoch callback on rank 0: the epoch's line in the output, progress.png redrawn (at most
    every DRAW_EVERY s, and after the last epoch)."""

    DRAW_EVERY = 30.0  # seconds between redraws of progress.png (and after the last epoch)

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.last, self.recent, self.drawn = cfg, time.time(), [], 0.0
        self.names: list[str] | None = None

    def __call__(self, log: list[dict], fold: FoldLayout) -> None:
        """Print the latest epoch (wall seconds; time left from the median of the last 5 epochs, so a slow
        first epoch or a busy spell does not skew it) and redraw the picture."""
        now, entry = time.time(), log[-1]
        self.recent = (self.recent + [now - self.last])[-5:]
        if self.names is None:
            self.names = class_names(self.cfg.run_dir, len(entry["pseudo_dice"]))
        left = statistics.median(self.recent) * (self.cfg.num_epochs - entry["epoch"] - 1)
        print(epoch_line(entry, self.cfg.num_epochs, self.names, now - self.last, left), flush=True)
        self.last = now
        if now - self.drawn >= self.DRAW_EVERY or entry["epoch"] + 1 >= self.cfg.num_epochs:
            progress_png(log, fold.progress)  # ~0.4 s: every epoch of a 10-s epoch would cost 4 %
            self.drawn = time.time()


def failure_causes(output: str) -> list[str]:
    """The lines of torchrun's output where a rank names its exception (`[rank1]: RuntimeError: ...`)."""
    return [ln for ln in output.strip().splitlines()
            if re.match(r"\[rank\d+\]: \w*(Error|Exception|Interrupt)\b", ln)]


def _collect(stream, lines: list[str], echo: bool) -> None:
    """Keep a pipe's lines (for the error message), passing them on to our stdout when `echo`."""
    for line in stream:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)


def _stop(proc: subprocess.Popen, expired: list[bool]) -> None:
    """The timeout: SIGTERM torchrun (it then stops its ranks), SIGKILL it a minute later."""
    expired.append(True)
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def launch(cfg: TrainConfig, nproc: int, timeout: float | None = None) -> list[dict]:
    """Train with `nproc` processes through torchrun (DDP); raises TrainingFailed naming the error."""
    fold = RunLayout(cfg.run_dir).fold(cfg.fold)
    fold.root.mkdir(parents=True, exist_ok=True)
    config_path = write_json(fold.train_config, asdict(cfg))
    cmd = [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
           "-m", "unetpp_lib.launch", str(config_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    out: list[str] = []
    err: list[str] = []
    expired: list[bool] = []
    timer = threading.Timer(timeout, _stop, (proc, expired)) if timeout else None
    reader = threading.Thread(target=_collect, args=(proc.stderr, err, False), daemon=True)
    reader.start()
    if timer:
        timer.start()
    try:
        _collect(proc.stdout, out, True)  # rank 0's epoch lines, as they come
        proc.wait()
        reader.join()
    finally:
        if timer:
            timer.cancel()
    if expired:
        raise TrainingFailed(f"torchrun with {nproc} processes exceeded {timeout} s and was stopped with all "
                             f"its ranks")
    if proc.returncode:
        text = "".join(out + err)
        causes = failure_causes(text)
        raise TrainingFailed(f"torchrun with {nproc} processes failed (exit {proc.returncode}); all ranks were "
                             f"stopped. Cause: {'; '.join(causes) or 'see below'}\n"
                             + "\n".join(text.strip().splitlines()[-15:]))
    return read_json(fold.train_log)["epochs"]


def tuned_for_ranks(cfg: TrainConfig, nproc: int) -> dict:
    """autotune's choice for each rank's share of the batch, probed once here on the first device (every rank
    runs the same network on the same kind of device), for the ranks to take from their config."""
    plans = read_json(RunLayout(cfg.run_dir).pre.plans)
    device = resolve_device(cfg.device)
    if device.type in ("cuda", "npu") and device.index is None:
        device = torch.device(device.type, 0)
    batch = max(1, int(plans["batch_size"]) // nproc)
    return autotune.choose("train", plans, batch, device, cfg.precision, cfg.channels_last).as_dict()


def run(cfg: TrainConfig, nproc: int = 1) -> list[dict]:
    """Train here (nproc 1) or with nproc DDP processes through torchrun; returns the epoch log."""
    if nproc > 1 and not cfg.tuned:
        cfg = replace(cfg, tuned=tuned_for_ranks(cfg, nproc))
    return launch(cfg, nproc) if nproc > 1 else train(cfg, EpochReport(cfg))


def torchrun(argv: list[str]) -> None:
    """torchrun (`torch.distributed.run`) that ends when its parent (the kernel) is gone; its ranks then follow."""
    from torch.distributed.run import main as torchrun_main

    watch_parent()
    torchrun_main(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun: `python -m unetpp_lib.launch CONFIG.json` runs one rank."""
    ap = argparse.ArgumentParser(description="one rank of a UNet++ training run")
    ap.add_argument("config", help="train_config.json written by launch()")
    args = ap.parse_args(argv)
    watch_parent(group=True)  # torchrun killed (even by SIGKILL): this rank and its loader workers end too
    cfg = TrainConfig(**read_json(args.config))
    train(cfg, EpochReport(cfg))


if __name__ == "__main__":
    main()
