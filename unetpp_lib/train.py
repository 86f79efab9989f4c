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
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .core import currency
from .nn import autotune, checkpoint
from .nn.augment import AugmentConfig, augment_batch, centre_crop, enlarged_size
from .nn.data import PatchSampler, forced_foreground, make_loader, pad_to_background, rank_slice
from .core.device import autocast, resolve_device
from .core.io import disk_space, read_json, write_json
from .core.layout import FoldLayout, PreLayout, RunLayout
from .nn.losses import DICE_SYNC, deep_supervision_loss, head_weights, pseudo_dice, tp_fp_fn
from .nn.model import ARCHITECTURE, build_model, config_dict, load_weights
from .core.params import SCHEMA, setting
from .nn.progress import StepReport
from .nn.schedule import RESCUE_MOMENTUM, poly_lr, rescue_zero_dice
from .nn.step import train_step
from .prep.store import check_preprocessed, verify_cases

EpochCallback = Callable[[list[dict], FoldLayout], None]  # (log so far, fold folder), on rank 0 after each epoch


@dataclass
class TrainConfig:
    """Everything a training run reads; defaults are the original recipe.

    Fields have 04_train's parameter names (`params.build` fills them) and take their defaults from the
    schema (core/params.py); `ddp_dice` and `tuned` are set by library callers only."""

    run_dir: str
    fold: int = setting("fold")
    device: str = setting("device")
    num_epochs: int = setting("num_epochs")
    iterations_per_epoch: int = setting("iterations_per_epoch")
    val_iterations: int = setting("val_iterations")
    initial_lr: float = setting("initial_lr")
    momentum: float = setting("momentum")
    weight_decay: float = setting("weight_decay")
    lr_exponent: float = setting("lr_exponent")
    grad_clip: float = setting("grad_clip")
    zero_dice_epoch: int = setting("zero_dice_epoch")  # v1: pseudo-Dice 0 after it: momentum 0.95, new weights
    precision: str = setting("precision")  # auto (measured: autotune.py) | bf16 | fp16 | fp32
    channels_last: bool | str = setting("channels_last")  # auto (measured) | True | False
    compile: bool = setting("compile")
    ds_weights: str = setting("ds_weights")  # exponential (8:4:2:1:0) | equal
    ddp_dice: str = "global"  # DDP batch Dice over the global batch; gradients: global (= 1 process) | v1 (Dice / world)
    augment: bool = setting("augment")
    save_every: int = setting("save_every")
    continue_training: bool = setting("continue_training")
    num_workers: int = setting("num_workers")  # loader processes per rank
    seed: int = setting("seed")
    tuned: dict | None = None  # autotune.Choice.as_dict() made before torchrun starts the ranks (launch.py)


CODE = "train-1"  # raised when a checkpoint of older code cannot be continued
# How a run is kept, not what it learns; num_epochs may grow to extend a finished training.
NOT_IN_KEY = {"continue_training", "save_every", "num_epochs", "tuned"}
FAIL_AT = "UNETPP_TEST_FAIL_AT_ITERATION"  # test hook (tests/test_train.py): the last rank raises at this iteration


def training_key(cfg: TrainConfig, plans: dict) -> dict:
    """What a training is made from (currency.py): the store's plans and every parameter that changes the
    result; where and how it runs (device, workers, paths) is left out, as run_all leaves it out."""
    params = {k: v for k, v in asdict(cfg).items()
              if k not in NOT_IN_KEY and not (k in SCHEMA and SCHEMA[k].operational)}
    return currency.work_key(params={**params, "plans_hash": plans["preprocessing_hash"]}, code=CODE)


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
        self.fail_at = int(os.environ.get(FAIL_AT, "-1"))  # test hook only
        self.rank, self.world, self.device = _setup_distributed(cfg)
        layout = RunLayout(cfg.run_dir)
        self.pre, self.out = layout.pre.root, layout.fold(cfg.fold)
        self.plans = read_json(layout.pre.plans)
        self.manifest = check_preprocessed(self.pre)  # refuses a store made for other plans
        self.train_cases, self.val_cases = _split_cases(layout.pre, cfg.fold)
        if self.rank == 0:  # once per training, not per batch: damaged cases are named and marked to be redone
            verify_cases(self.pre, self.train_cases + self.val_cases)
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
        """Continue from the latest checkpoint (model, optimiser, scaler, epoch, log, RNG states); from the one
        before it, with a warning, when the latest is damaged or incomplete."""
        state, meta, warning = checkpoint.load_latest(self.out.root, map_location=self.device)
        if warning and self.rank == 0:
            print(warning, flush=True)
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
        need = 32 * sum(p.numel() for p in self.net.parameters())  # 4 kinds x (weights + momentum) x 4 B
        with disk_space(self.out.root, need, "04_train"):
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
        return autocast(self.device, self.dtype)

    def _train_epoch(self, it, report: "StepReport | None" = None) -> tuple[float, float]:
        """One epoch of SGD steps; (mean loss, seconds). `report` gets each step's data and compute seconds."""
        self.model.train()
        total, t0 = torch.zeros((), device=self.device), time.perf_counter()
        for i in range(self.cfg.iterations_per_epoch):
            if self.rank == self.world - 1 and self.epoch * self.cfg.iterations_per_epoch + i == self.fail_at:
                raise RuntimeError(f"test hook: rank {self.rank} fails at iteration {self.fail_at}")
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
            lr = poly_lr(self.cfg.initial_lr, self.epoch, self.cfg.num_epochs, self.cfg.lr_exponent)
            for group in self.opt.param_groups:
                group["lr"] = lr
            first = self.rank == 0 and self.epoch == start
            report = StepReport(self.cfg.iterations_per_epoch, self.cfg.num_epochs, self.epoch, self.cfg.num_workers,
                                self.choice) if first else None
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


def train(cfg: TrainConfig, on_epoch: EpochCallback | None = None) -> list[dict]:
    """Train one fold in this process (or as one rank under torchrun); returns the epoch log."""
    try:
        return Trainer(cfg, on_epoch).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
