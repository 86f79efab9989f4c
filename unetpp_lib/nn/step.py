"""One SGD step on the every-head loss: shared by the training loop and the benchmark's throughput timing."""
from __future__ import annotations


import torch

from ..core.device import autocast
from .losses import deep_supervision_loss


def train_step(model, opt, scaler, img, lab, weights, grad_clip: float, dtype,
               dice_sync: str | None = None) -> torch.Tensor:
    """One SGD step: forward under autocast, every-head loss, scaled backward, clipping, step; the loss."""
    opt.zero_grad(set_to_none=True)
    with autocast(img.device, dtype):
        outputs = model(img)
    loss = deep_supervision_loss(outputs, lab, weights, dice_sync)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    # as v1 (nnUNetTrainerV2): gradient norm clipped at 12 after unscaling
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach()
