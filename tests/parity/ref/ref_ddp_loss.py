"""v1's nnUNetTrainerV2_DDP.compute_loss in a real 2-process gloo world (its awesome_allgather_function included).

args: heads (per rank, per head .npy logits (b, C, *S)), targets (per rank .npy labels (b, *S)), weights,
store (a file path for the process group). Each rank calls compute_loss on its own half; saves, per rank,
the loss and d(loss)/d(logits) per head (before any DDP averaging: no model here).
"""
import types

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _ref


def rank_main(rank: int, a: dict) -> None:
    """One rank: join the group, run v1's compute_loss on this rank's logits, save loss and gradients."""
    from nnunet.training.loss_functions.crossentropy import RobustCrossEntropyLoss
    from nnunet.training.network_training.nnUNetTrainerV2_DDP import nnUNetTrainerV2_DDP

    dist.init_process_group("gloo", init_method="file://" + a["store"], rank=rank, world_size=len(a["heads"]))
    # the attributes compute_loss reads, as nnUNetTrainerV2_DDP sets them (batch_dice True by default)
    trainer = types.SimpleNamespace(batch_dice=True, ce_loss=RobustCrossEntropyLoss(),
                                    ds_loss_weights=np.array(a["weights"]))
    logits = [torch.from_numpy(np.load(p)).float().requires_grad_(True) for p in a["heads"][rank]]
    target = torch.from_numpy(np.load(a["targets"][rank])).float()[:, None]
    loss = nnUNetTrainerV2_DDP.compute_loss(trainer, logits, [target] * len(logits))
    loss.backward()
    _ref.save_array(a, f"loss_{rank}", loss.detach().numpy())
    for i, x in enumerate(logits):
        _ref.save_array(a, f"grad_{rank}_{i}", x.grad.numpy())
    dist.destroy_process_group()


if __name__ == "__main__":
    a = _ref.args()
    _ref.cpu_only()
    torch.set_num_threads(1)
    # import v1 once here; forked ranks inherit it (spawning would import it once per rank)
    import nnunet.training.network_training.nnUNetTrainerV2_DDP  # noqa: F401
    mp.start_processes(rank_main, args=(a,), nprocs=len(a["heads"]), join=True, start_method="fork")
    world = len(a["heads"])
    losses = [float(np.load(f"{a['out']}/loss_{r}.npy")) for r in range(world)]
    _ref.done(a, {"loss_per_rank": losses})
