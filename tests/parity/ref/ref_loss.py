"""v1's DC_and_CE_loss (the trainer's settings) per head and MultipleOutputLoss2 on the given logits and targets.

args: cases, each {heads: [.npy logits (B, C, *S)], targets: [.npy labels (B, *S)], one per head}, heads X(0, 1)
first. The deep-supervision weights are the ones nnUNetTrainerV2.initialize computes for as many poolings as
heads (v1's own code path, not a restatement), reversed from v1's deepest-first order to the list's order.
Saves, per case k, the per-head loss values, the weighted sum and d(sum)/d(logits) per head (grad_k_i); result
also holds `weights` per head count.
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


def v1_ds_weights(num_pool: int) -> np.ndarray:
    """ds_loss_weights as nnUNetTrainerV2.initialize(training=False) sets them (network, optimiser and plans stubbed)."""
    import tempfile

    from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2
    from torch import nn

    t = nnUNetTrainerV2.__new__(nnUNetTrainerV2)  # only what initialize reads on its training=False path
    t.was_initialized, t.output_folder, t.plans = False, tempfile.mkdtemp(), {"data_identifier": "x"}
    t.dataset_directory, t.stage, t.loss = t.output_folder, 1, loss
    t.net_num_pool_op_kernel_sizes = [[2, 2, 2]] * num_pool
    t.process_plans = lambda plans: None
    t.setup_DA_params = lambda: None
    t.initialize_optimizer_and_scheduler = lambda: None
    t.print_to_log_file = lambda *args, **kwargs: None

    def network():
        t.network = nn.DataParallel(nn.Identity())  # initialize asserts a network exists

    t.initialize_network = network
    nnUNetTrainerV2.initialize(t, training=False)
    return np.asarray(t.ds_loss_weights)


results, weights = [], {}
for k, case in enumerate(a["cases"]):
    n = len(case["heads"])
    weights.setdefault(n, v1_ds_weights(n)[::-1].copy())  # v1's outputs come deepest first, ours X(0, 1) first
    ds_loss = MultipleOutputLoss2(loss, weights[n])
    logits = [torch.from_numpy(np.load(p)).float().requires_grad_(True) for p in case["heads"]]
    targets = [torch.from_numpy(np.load(p)).float()[:, None] for p in case["targets"]]  # v1: float (B, 1, *S)
    per_head = [float(loss(x, y)) for x, y in zip(logits, targets)]
    total = ds_loss(logits, targets)
    total.backward()
    for i, x in enumerate(logits):
        _ref.save_array(a, f"grad_{k}_{i}", x.grad.numpy())
    results.append({"per_head": per_head, "total": float(total)})
for n in a.get("depths", []):
    weights.setdefault(n, v1_ds_weights(n)[::-1].copy())
_ref.done(a, {"cases": results, "weights": {str(n): w for n, w in weights.items()}})
