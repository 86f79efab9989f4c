"""The original recipe's schedule (nnUNetTrainerV2): the poly learning rate and the epoch-100 rescue."""
from __future__ import annotations

import math

import numpy as np
import torch

from .model import init_weights


def poly_lr(initial_lr: float, epoch: int, num_epochs: int, exponent: float) -> float:
    """lr = initial x (1 - epoch / epochs)^exponent."""
    return initial_lr * (1 - epoch / num_epochs) ** exponent


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
