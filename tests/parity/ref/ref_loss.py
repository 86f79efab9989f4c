"""v1's DC_and_CE_loss (the trainer's settings) per head and MultipleOutputLoss2 on the given logits and targets.

args: cases, each {heads: [.npy logits (B, C, *S)], targets: [.npy labels (B, *S)], one per head; weights}.
Saves, per case k, the per-head loss values, the weighted sum and d(sum)/d(logits) per head (grad_k_i).
"""
import numpy as np
import torch

import _ref

a = _ref.args()
_ref.cpu_only()
from nnunet.training.loss_functions.deep_supervision import MultipleOutputLoss2  # noqa: E402
from nnunet.training.loss_functions.dice_loss import DC_and_CE_loss  # noqa: E402

# exactly nnUNetTrainer.__init__'s loss (batch_dice True), wrapped as in nnUNetTrainerV2.initialize
loss = DC_and_CE_loss({'batch_dice': True, 'smooth': 1e-5, 'do_bg': False}, {})
results = []
for k, case in enumerate(a["cases"]):
    ds_loss = MultipleOutputLoss2(loss, np.array(case["weights"]))
    logits = [torch.from_numpy(np.load(p)).float().requires_grad_(True) for p in case["heads"]]
    targets = [torch.from_numpy(np.load(p)).float()[:, None] for p in case["targets"]]  # v1: float (B, 1, *S)
    per_head = [float(loss(x, y)) for x, y in zip(logits, targets)]
    total = ds_loss(logits, targets)
    total.backward()
    for i, x in enumerate(logits):
        _ref.save_array(a, f"grad_{k}_{i}", x.grad.numpy())
    results.append({"per_head": per_head, "total": float(total)})
_ref.done(a, {"cases": results})
