"""Progress of a training run inside its first epoch, before any epoch line (04_train prints it)."""
from __future__ import annotations

import os
import statistics
import time

from ..core.terminal import duration
from . import autotune


class StepReport:
    """Progress inside the first epoch of a run, before any epoch line: the step count, seconds per step and the
    projected epoch and run time, after the first step and every `every` s; once, a warning when steps take
    SLOWER times the probe's figure for this setting, with the likely cause."""

    SLOWER = 5.0

    def __init__(self, iterations: int, num_epochs: int, epoch: int, num_workers: int, choice: autotune.Choice,
                 every: float = 10.0):
        self.iterations, self.num_epochs, self.epoch, self.every = iterations, num_epochs, epoch, every
        self.num_workers = num_workers
        self.expected = choice.seconds(choice.precision, choice.channels_last)
        self.setting = autotune.setting_name(choice.precision, choice.channels_last)
        self.data: list[float] = []
        self.compute: list[float] = []
        self.shown, self.warned = 0.0, False

    def step(self, i: int, data_s: float, compute_s: float) -> None:
        """Record step `i` (1-based); print the progress line when it is due."""
        self.data.append(data_s)
        self.compute.append(compute_s)
        now = time.perf_counter()
        if i == 1 or now - self.shown >= self.every or i == self.iterations:
            self.shown = now
            print(self.line(i), flush=True)
        if not self.warned and self.expected and i >= 2:
            per = statistics.median([d + c for d, c in zip(self.data[1:], self.compute[1:])])
            if per > self.SLOWER * self.expected:
                self.warned = True
                print(self.slow_warning(per), flush=True)

    def line(self, i: int) -> str:
        """`epoch 1/40: step 3/25, 0.45 s/step -> epoch ~11 s, training ~7 min 30 s`."""
        steps = [d + c for d, c in zip(self.data, self.compute)]
        per = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]  # the first step warms kernels up
        epoch = per * self.iterations
        run = epoch * (self.num_epochs - self.epoch)
        return (f"epoch {self.epoch + 1}/{self.num_epochs}: step {i}/{self.iterations}, "
                f"{per:.2f} s/step -> epoch ~{duration(epoch)}, training ~{duration(run)}")

    def slow_warning(self, per: float) -> str:
        """Why steps are far slower than the probe measured: waiting for data, a busy CPU, or unknown."""
        data = statistics.median(self.data[1:])
        if data > 0.5 * per:
            cause = (f"most of each step ({data:.2f} s) waits for data: the loader workers (num_workers "
                     f"{self.num_workers}) or the augmentation are the bottleneck")
        elif hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5:
            cause = (f"the CPU is shared: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (another "
                     f"run, a test suite or a browser?); threads competing for cores slow each other far more than 2x")
        else:
            cause = "the device is busy with other work, or memory is swapping"
        return (f"warning: steps take {per:.2f} s, {per / self.expected:.0f}x the {self.expected:.3g} s the probe "
                f"measured for {self.setting} on this machine. Likely cause: {cause}")
