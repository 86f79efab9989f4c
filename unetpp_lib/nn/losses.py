"""Cross-entropy + soft Dice on every UNet++ head, and the pseudo-Dice used to pick models.

Under DDP the Dice is a batch Dice over the *global* batch, as in nnU-Net v1's
nnUNetTrainerV2_DDP: each rank's numerator 2TP and denominator 2TP + FP + FN are summed
over all ranks (with gradient) before the ratio. Cross-entropy stays a per-rank mean;
DDP's averaging of gradients makes it the global mean.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -1  # label value of padding; the trainer maps it to background before the loss (as v1 does)
DICE_SYNC = ("global", "v1")  # how the DDP Dice passes gradients back: see _SumOverRanks


class _SumOverRanks(torch.autograd.Function):
    """Sum of a tensor over ranks, differentiable.

    "global": each rank gets the gradient of the sum of all ranks' losses, so after DDP averages
    gradients (divides by the world size) they equal a 1-process run on the global batch.
    "v1": each rank keeps only its own loss' gradient (v1's awesome_allgather_function returns its
    slice of grad_output), so after DDP's averaging the Dice gradient is 1 / world size of that.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, mode: str) -> torch.Tensor:
        ctx.mode = mode
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.mode == "global":
            grad = grad.clone()
            dist.all_reduce(grad)
        return grad, None


def _synced(sync: str | None) -> bool:
    """Whether the Dice terms are summed over ranks (a DDP run with a sync mode)."""
    if sync is None:
        return False
    if sync not in DICE_SYNC:
        raise ValueError(f"dice sync {sync!r}: use one of {DICE_SYNC} or None")
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dice_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2TP, 2TP + FP + FN) of the softmax per foreground class, summed over batch and space.

    logits (B, C, D, H, W); target (B, D, H, W) int64 with IGNORE where unlabelled.
    """
    probs = torch.softmax(logits.float(), dim=1)
    valid = (target != IGNORE).unsqueeze(1)
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    probs, onehot = probs * valid, onehot * valid
    dims = [0, *range(2, logits.dim())]
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    return (2 * tp)[1:], (2 * tp + fp + fn)[1:]  # background excluded


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   sync: str | None = None) -> torch.Tensor:
    """Negative batch soft Dice, mean over foreground classes; over the global batch under DDP if `sync`."""
    num, den = dice_terms(logits, target)
    if _synced(sync):
        num, den = _SumOverRanks.apply(torch.stack([num, den]), sync)  # one collective for both
        eps = 0.0  # nnUNetTrainerV2_DDP.compute_loss has no 1e-8 ...
    else:
        eps = 1e-8  # ... v1's SoftDiceLoss (one process) adds it to the denominator
    return -((num + smooth) / (den + smooth + eps)).mean()


def dc_ce_loss(logits: torch.Tensor, target: torch.Tensor, sync: str | None = None) -> torch.Tensor:
    """Cross-entropy + soft Dice (nnU-Net's DC_and_CE_loss); goes negative as Dice nears 1."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
    return ce + soft_dice_loss(logits, target, sync=sync)


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


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor, weights: list[float],
                          sync: str | None = None) -> torch.Tensor:
    """Weighted sum of DC+CE over every head, each against the full-resolution target.

    A head weighted 0 stays in the graph (with zero gradient) so DDP sees every parameter used,
    and every rank makes the same collective calls.
    """
    return sum(w * dc_ce_loss(o, target, sync) for o, w in zip(outputs, weights))


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
