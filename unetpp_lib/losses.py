"""Cross-entropy + soft Dice on every UNet++ head, and the pseudo-Dice used to pick models."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -1  # label value of padding: no loss there


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Negative batch soft Dice over foreground classes: sums over batch and space, then the ratio.

    logits (B, C, D, H, W); target (B, D, H, W) int64 with IGNORE where unlabelled.
    """
    probs = torch.softmax(logits.float(), dim=1)
    valid = (target != IGNORE).unsqueeze(1)
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    probs, onehot = probs * valid, onehot * valid
    dims = (0, 2, 3, 4)
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return -dice[1:].mean()  # background excluded


def dc_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice (nnU-Net's DC_and_CE_loss); goes negative as Dice nears 1."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
    return ce + soft_dice_loss(logits, target)


def head_weights(depth: int, scheme: str = "exponential") -> list[float]:
    """Loss weight per head X(0,1)..X(0,L): halving from the deepest, shallowest 0 (8:4:2:1:0 / 15), or equal."""
    if scheme == "equal":
        return [1.0 / depth] * depth
    if scheme != "exponential":
        raise ValueError(f"deep supervision weights {scheme!r}: use exponential or equal")
    w = [0.5 ** (depth - 1 - j) for j in range(depth)]  # shallowest first
    if depth > 1:
        w[0] = 0.0
    return [v / sum(w) for v in w]


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted sum of DC+CE over every head, each against the full-resolution target.

    A head weighted 0 stays in the graph (with zero gradient) so DDP sees every parameter used.
    """
    return sum(w * dc_ce_loss(o, target) for o, w in zip(outputs, weights))


@torch.no_grad()
def tp_fp_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(3, C-1) true positives, false positives, false negatives of the argmax per foreground class."""
    pred = logits.argmax(1)
    valid = target != IGNORE
    out = []
    for c in range(1, logits.shape[1]):
        p, t = (pred == c) & valid, (target == c) & valid
        out.append(torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]))
    return torch.stack(out, 1).double()


def pseudo_dice(counts: torch.Tensor) -> list[float]:
    """Global Dice 2TP / (2TP + FP + FN) per foreground class from summed counts (NaN if empty)."""
    tp, fp, fn = counts
    denom = 2 * tp + fp + fn
    return [float("nan") if d == 0 else float(2 * a / d) for a, d in zip(tp, denom)]
