"""04_train: UNet++ with every head supervised, on one device or several through torchrun (DDP).

The recipe is the original's (nnUNetTrainerV2): SGD with Nesterov momentum 0.99, weight
decay 3e-5, lr 0.01 x (1 - epoch / epochs)^0.9, gradient norm clipped at 12, epochs of
250 iterations and 50 validation iterations giving a global pseudo-Dice per class, whose
moving average picks the best checkpoint; if the pseudo-Dice of epoch 100 (0-based) is exactly 0,
momentum drops to 0.95 and the weights are drawn anew (v1's rescue for a run stuck at
background). The original's bug is fixed: the loss covers
every head (weights 8:4:2:1:0 / 15 from X(0,5) to X(0,1)), not the shallowest only.
Under DDP the batch Dice is over the global batch, as in nnUNetTrainerV2_DDP (`ddp_dice`).

This module is the loop: `train(TrainConfig(...), on_epoch)` trains in this process or as
one rank under torchrun (rank 0 alone writes files). Starting runs (one process, or several
through torchrun), the per-rank CLI and drawing progress.png per epoch are launch.py's.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .core import currency
from .nn import autotune, checkpoint
from .nn.augment import AugmentConfig, augment_batch, centre_crop, enlarged_size
from .nn.data import PatchSampler, forced_foreground, make_loader, pad_to_background, rank_slice
from .core.device import resolve_device
from .core.io import read_json, write_json
from .core.layout import FoldLayout, PreLayout, RunLayout
from .nn.losses import DICE_SYNC, deep_supervision_loss, head_weights, pseudo_dice, tp_fp_fn
from .nn.model import ARCHITECTURE, build_model, config_dict, init_weights, load_weights
from .core.parallel import duration
from .core.params import SCHEMA
from .nn.step import train_step
from .prep.store import check_preprocessed

EpochCallback = Callable[[list[dict], FoldLayout], None]  # (log so far, fold folder), on rank 0 after each epoch


@dataclass
class TrainConfig:
    """Everything a training run reads; defaults are the original recipe.

    Fields have 04_train's parameter names (`params.build` fills them); `ddp_dice` and the test hook
    `fail_at_iteration` are set by library callers only."""

    run_dir: str
    fold: int = 0
    device: str = "auto"
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    initial_lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    lr_exponent: float = 0.9
    grad_clip: float = 12.0
    zero_dice_epoch: int = 100  # v1: a pseudo-Dice of 0 after this (0-based) epoch: momentum 0.95, new weights
    precision: str = "auto"  # auto (measured: autotune.py) | bf16 | fp16 | fp32
    channels_last: bool | str = "auto"  # auto (measured) | True | False
    compile: bool = False
    ds_weights: str = "exponential"  # exponential (8:4:2:1:0) | equal
    ddp_dice: str = "global"  # DDP batch Dice over the global batch; gradients: global (= 1 process) | v1 (Dice / world)
    augment: bool = True
    save_every: int = 50
    continue_training: bool = False
    num_workers: int = 2  # loader processes per rank
    seed: int = 0
    fail_at_iteration: int = -1  # test hook: the last rank raises at this global iteration
    tuned: dict | None = None  # autotune.Choice.as_dict() made before torchrun starts the ranks (launch.py)


CODE = "train-1"  # raised when a checkpoint of older code cannot be continued
# How a run is kept, not what it learns; num_epochs may grow to extend a finished training.
NOT_IN_KEY = {"continue_training", "save_every", "fail_at_iteration", "num_epochs", "tuned"}


def training_key(cfg: TrainConfig, plans: dict) -> dict:
    """What a training is made from (currency.py): the store's plans and every parameter that changes the
    result; where and how it runs (device, workers, paths) is left out, as run_all leaves it out."""
    params = {k: v for k, v in asdict(cfg).items()
              if k not in NOT_IN_KEY and not (k in SCHEMA and SCHEMA[k].operational)}
    return currency.work_key(params={**params, "plans_hash": plans["preprocessing_hash"]}, code=CODE)


def poly_lr(cfg: TrainConfig, epoch: int) -> float:
    """lr = initial x (1 - epoch / epochs)^exponent."""
    return cfg.initial_lr * (1 - epoch / cfg.num_epochs) ** cfg.lr_exponent


RESCUE_MOMENTUM = 0.95


def rescue_zero_dice(opt: torch.optim.Optimizer, net: torch.nn.Module, dice: list[float]) -> bool:
    """v1's nnUNetTrainerV2.on_epoch_end at epoch 100: if the epoch's mean foreground pseudo-Dice (NaN classes left
    out) is exactly 0, set momentum 0.95 and re-draw the conv weights (He, a = 1e-2; norms and SGD buffers kept)."""
    seen = [d for d in dice if not math.isnan(d)]
    if not seen or float(np.mean(seen)) != 0.0:  # v1: the mean of no classes is NaN, and NaN != 0
        return False
    for group in opt.param_groups:  # v1 sets param_groups[0]; the kit has only that group
        group["momentum"] = RESCUE_MOMENTUM
    with torch.no_grad():
        net.apply(init_weights)
    return True


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if world == 1:
        return 0, 1, device
    local = int(os.environ["LOCAL_RANK"])
    if device.type in ("cuda", "npu"):
        device = torch.device(device.type, local)
        getattr(torch, device.type).set_device(device)
    dist.init_process_group({"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo"))
    return dist.get_rank(), world, device


def _split_cases(pre: PreLayout, fold: int) -> tuple[list[str], list[str]]:
    """Training and validation cases of a fold from splits.json."""
    splits = read_json(pre.splits)
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} does not exist: {pre.splits} has folds 0..{len(splits) - 1}")
    return splits[fold]["train"], splits[fold]["val"]


def _reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum a tensor over ranks."""
    if world > 1:
        dist.all_reduce(t)
    return t


class Trainer:
    """State of one run: model, optimiser, loaders, log; `fit` runs the epochs."""

    def __init__(self, cfg: TrainConfig, on_epoch: EpochCallback | None = None):
        self.cfg, self.on_epoch = cfg, on_epoch
        self.rank, self.world, self.device = _setup_distributed(cfg)
        layout = RunLayout(cfg.run_dir)
        self.pre, self.out = layout.pre.root, layout.fold(cfg.fold)
        self.plans = read_json(layout.pre.plans)
        self.manifest = check_preprocessed(self.pre)  # refuses a store made for other plans
        self.train_cases, self.val_cases = _split_cases(layout.pre, cfg.fold)
        torch.manual_seed(cfg.seed + self.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick its fastest kernels
        self.choice = self._settle()
        self.channels_last = self.choice.channels_last
        self.net = build_model(self.plans).to(self.device)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last_3d)
        self.model = self.net
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.net)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=cfg.initial_lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=True)
        self.dtype = self.choice.dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.weights = head_weights(self.net.cfg.depth, cfg.ds_weights)
        if cfg.ddp_dice not in DICE_SYNC:
            raise ValueError(f"ddp_dice {cfg.ddp_dice!r}: use one of {DICE_SYNC}")
        self.dice_sync = cfg.ddp_dice if self.world > 1 else None  # batch Dice over the global batch
        self.aug = AugmentConfig(dummy_2d=bool(self.plans.get("do_dummy_2D_data_aug", False)))
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.epoch, self.log, self.best_ema = 0, [], -1.0
        if cfg.continue_training:
            self._resume()

    def _settle(self) -> autotune.Choice:
        """Precision and layout for this run: measured by autotune's probe (cached) where `auto`, checked where
        set; given by the launcher under torchrun (one probe, not one per rank). Printed before the first step."""
        cfg, batch = self.cfg, int(self.plans["batch_size"]) // self.world
        if cfg.tuned:
            known = {f for f in autotune.Choice.__dataclass_fields__}
            choice = autotune.Choice(**{k: v for k, v in cfg.tuned.items() if k in known})
        elif self.world == 1:
            choice = autotune.choose("train", self.plans, batch, self.device, cfg.precision, cfg.channels_last)
        else:  # a rank started without the launcher's probe: the static rule (fp32 CPU, fp16 GPU, channels-first)
            default = autotune.candidates(self.device)[0]
            choice = autotune.Choice(default[0] if cfg.precision == "auto" else cfg.precision,
                                     default[1] if cfg.channels_last == "auto" else bool(cfg.channels_last),
                                     "train", str(self.device))
        if self.rank == 0:
            print(f"precision and layout: {choice.summary()}", flush=True)
            if choice.warning:
                print(choice.warning, flush=True)
        return choice

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        """Everything needed to continue exactly: weights, optimiser, scaler, epoch, RNGs."""
        state = {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": self.epoch, "best_ema": self.best_ema, "rng_torch": torch.get_rng_state(),
                 "rng_augment": self.gen.get_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _resume(self) -> None:
        """Continue from the latest checkpoint (model, optimiser, scaler, epoch, log, RNG states)."""
        state, meta = checkpoint.load(self.out.root, "latest", map_location=self.device)
        key = training_key(self.cfg, self.plans)
        if meta.get("key", key)["params"] != key["params"] or meta["plans_hash"] != self.plans["preprocessing_hash"]:
            was, now = meta.get("key", {}).get("params", {"plans_hash": meta["plans_hash"]}), key["params"]
            changed = currency.changed(was, now)
            raise ValueError(f"{self.out.root}: the latest checkpoint was trained with other {', '.join(changed)}; "
                             f"set continue_training: false to start over, or restore those values to continue")
        load_weights(self.net, state["model"], f"{self.out.root} (latest checkpoint)")
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best_ema = int(state["epoch"]), float(state["best_ema"])
        best = self.out.sidecar("best")
        if best.is_file():  # a best saved after the latest checkpoint must not be overwritten by a worse one
            self.best_ema = max(self.best_ema, float(read_json(best)["metrics"].get("ema_pseudo_dice", -1.0)))
        if self.world == 1:
            torch.set_rng_state(state["rng_torch"].cpu())
            self.gen.set_state(state["rng_augment"].cpu())
            if "rng_cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        else:  # rank 0 saved its own states only: give every rank its own stream again
            torch.manual_seed(self.cfg.seed + 7919 * self.epoch + self.rank)
            self.gen.manual_seed(self.cfg.seed * 1000 + 7919 * self.epoch + self.rank)
        log_path = self.out.train_log
        self.log = [e for e in read_json(log_path)["epochs"] if e["epoch"] < self.epoch] if log_path.is_file() else []

    def _save(self, kind: str) -> None:
        """Rank 0 writes a checkpoint with its JSON sidecar."""
        if self.rank:
            return
        last = self.log[-1] if self.log else {}
        write_json(self.out.plans, self.plans)  # beside the weights, so the fold folder predicts on its own
        checkpoint.save(self.out.root, kind, self._state(), {
            "epoch": self.epoch, "fold": self.cfg.fold, "plans_hash": self.plans["preprocessing_hash"],
            "params": asdict(self.cfg), "key": training_key(self.cfg, self.plans),
            "network": config_dict(self.net), "architecture": ARCHITECTURE, "metrics": last,
            "world_size": self.world})

    # ------------------------------------------------------------------ loops
    def _loaders(self):
        """Train and validation batch iterators for this rank (seeded by epoch, so a resume draws new batches)."""
        B = int(self.plans["batch_size"])
        mine = rank_slice(B, self.rank, self.world)
        forced = forced_foreground(B)[mine]
        patch = self.plans["patch_size"]
        pin = self.device.type == "cuda"
        seed = self.cfg.seed + 7919 * self.epoch + 104729 * self.rank
        tr = PatchSampler(self.pre, self.train_cases, enlarged_size(patch, self.aug) if self.cfg.augment else patch, patch)
        va = PatchSampler(self.pre, self.val_cases, patch, patch)
        return (iter(make_loader(tr, forced, seed, self.cfg.num_workers, pin)),
                iter(make_loader(va, forced, seed + 1, min(self.cfg.num_workers, 1), pin)))

    def _batch(self, it, augment: bool):
        """Next batch on the device, augmented (train) or as loaded (validation)."""
        img, lab = next(it)
        img = img.to(self.device, non_blocking=True).float()
        lab = lab.to(self.device, non_blocking=True).long()
        if augment:
            img, lab = augment_batch(img, lab, self.plans["patch_size"], self.plans["num_classes"], self.aug, self.gen)
        elif img.shape[2:] != tuple(self.plans["patch_size"]):
            img, lab = centre_crop(img, lab, self.plans["patch_size"])
        lab = pad_to_background(lab)  # as v1: outside the image is background for loss and Dice, not ignored
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last_3d)
        return img, lab

    def _autocast(self):
        """Mixed-precision context for the forward pass."""
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    def _train_epoch(self, it, report: "StepReport | None" = None) -> tuple[float, float]:
        """One epoch of SGD steps; (mean loss, seconds). `report` gets each step's data and compute seconds."""
        self.model.train()
        total, t0 = torch.zeros((), device=self.device), time.perf_counter()
        for i in range(self.cfg.iterations_per_epoch):
            if self.rank == self.world - 1 and self.epoch * self.cfg.iterations_per_epoch + i == self.cfg.fail_at_iteration:
                raise RuntimeError(f"test hook: rank {self.rank} fails at iteration {self.cfg.fail_at_iteration}")
            t_data = time.perf_counter()
            img, lab = self._batch(it, self.cfg.augment)
            t_step = time.perf_counter()
            loss = train_step(self.model, self.opt, self.scaler, img, lab, self.weights, self.cfg.grad_clip, self.dtype,
                              self.dice_sync)
            if report:
                float(loss)  # waits for the device, so the step's time is its own
                report.step(i + 1, t_step - t_data, time.perf_counter() - t_step)
            total += loss
        return float(_reduce(total, self.world)) / (self.cfg.iterations_per_epoch * self.world), time.perf_counter() - t0

    @torch.no_grad()
    def _validate(self, it) -> tuple[float, list[float]]:
        """Validation patches without augmentation: (mean loss, global pseudo-Dice per foreground class)."""
        self.model.eval()
        counts = torch.zeros(3, self.plans["num_classes"] - 1, dtype=torch.float64, device=self.device)
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.val_iterations):
            img, lab = self._batch(it, False)
            with self._autocast():
                outputs = self.model(img)
            total += deep_supervision_loss(outputs, lab, self.weights, self.dice_sync).float()
            counts += tp_fp_fn(outputs[-1], lab)  # the deepest head, which inference uses
        n = max(self.cfg.val_iterations, 1) * self.world
        return float(_reduce(total, self.world)) / n, pseudo_dice(_reduce(counts, self.world).cpu())

    def fit(self) -> list[dict]:
        """Run the remaining epochs; returns the log."""
        B = int(self.plans["batch_size"])
        start = self.epoch
        while self.epoch < self.cfg.num_epochs:
            train_it, val_it = self._loaders()
            lr = poly_lr(self.cfg, self.epoch)
            for group in self.opt.param_groups:
                group["lr"] = lr
            first = self.rank == 0 and self.epoch == start
            report = StepReport(self.cfg, self.epoch, self.choice) if first else None
            train_loss, seconds = self._train_epoch(train_it, report)
            val_loss, dice = self._validate(val_it)
            mean_dice = float(np.nanmean(dice)) if not all(math.isnan(d) for d in dice) else 0.0
            # v1's val_eval_criterion_MA: alpha 0.9, started at the first epoch's value
            ema = mean_dice if not self.log else 0.9 * self.log[-1]["ema_pseudo_dice"] + 0.1 * mean_dice
            self.log.append({"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss,
                             "pseudo_dice": dice, "ema_pseudo_dice": ema, "lr": lr, "epoch_seconds": round(seconds, 3),
                             "samples_per_s": round(B * self.cfg.iterations_per_epoch / seconds, 3)})
            if self.epoch == self.cfg.zero_dice_epoch and rescue_zero_dice(self.opt, self.net, dice):
                self.log[-1]["rescued"] = f"pseudo-Dice 0: momentum {RESCUE_MOMENTUM}, weights re-initialised"
                if self.world > 1:  # every rank drew its own weights: all take rank 0's, as DDP does at the start
                    for t in self.net.state_dict().values():
                        dist.broadcast(t, 0)
                if self.rank == 0:
                    print(f"epoch {self.epoch}: {self.log[-1]['rescued']} (as nnU-Net v1)", flush=True)
            self.epoch += 1
            if self.rank == 0:
                write_json(self.out.train_log, {"fold": self.cfg.fold, "epochs": self.log,
                                                "precision_and_layout": self.choice.as_dict()})
                if self.on_epoch:
                    self.on_epoch(self.log, self.out)
            if ema > self.best_ema:  # as v1: "best" is the best moving average, not the best epoch
                self.best_ema = ema
                self._save("best")
            if self.epoch % self.cfg.save_every == 0 or self.epoch == self.cfg.num_epochs:
                self._save("latest")
        self._save("final")
        return self.log


class StepReport:
    """Progress inside the first epoch of a run, before any epoch line: the step count, seconds per step and the
    projected epoch and run time, after the first step and every `every` s; once, a warning when steps take
    SLOWER times the probe's figure for this setting, with the likely cause."""

    SLOWER = 5.0

    def __init__(self, cfg: TrainConfig, epoch: int, choice: autotune.Choice, every: float = 10.0):
        self.cfg, self.epoch, self.every = cfg, epoch, every
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
        if i == 1 or now - self.shown >= self.every or i == self.cfg.iterations_per_epoch:
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
        epoch = per * self.cfg.iterations_per_epoch
        run = epoch * (self.cfg.num_epochs - self.epoch)
        return (f"epoch {self.epoch + 1}/{self.cfg.num_epochs}: step {i}/{self.cfg.iterations_per_epoch}, "
                f"{per:.2f} s/step -> epoch ~{duration(epoch)}, training ~{duration(run)}")

    def slow_warning(self, per: float) -> str:
        """Why steps are far slower than the probe measured: waiting for data, a busy CPU, or unknown."""
        data = statistics.median(self.data[1:])
        if data > 0.5 * per:
            cause = (f"most of each step ({data:.2f} s) waits for data: the loader workers (num_workers "
                     f"{self.cfg.num_workers}) or the augmentation are the bottleneck")
        elif hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5:
            cause = (f"the CPU is shared: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (another "
                     f"run, a test suite or a browser?); threads competing for cores slow each other far more than 2x")
        else:
            cause = "the device is busy with other work, or memory is swapping"
        return (f"warning: steps take {per:.2f} s, {per / self.expected:.0f}x the {self.expected:.3g} s the probe "
                f"measured for {self.setting} on this machine. Likely cause: {cause}")


def train(cfg: TrainConfig, on_epoch: EpochCallback | None = None) -> list[dict]:
    """Train one fold in this process (or as one rank under torchrun); returns the epoch log."""
    try:
        return Trainer(cfg, on_epoch).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
