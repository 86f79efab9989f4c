"""DDP Dice (fix 1): 2 gloo processes vs v1 in one process on the global batch, and vs v1's nnUNetTrainerV2_DDP.compute_loss.

v1 all-gathers each rank's 2TP and 2TP + FP + FN (with gradient) and takes the Dice of the
sums, so the Dice is over the global batch; cross-entropy is a per-rank mean that DDP's
gradient averaging turns into the global mean. Its all-gather hands each rank only its own
slice of the gradient, so after DDP divides by the world size the Dice gradient is 1 / W of
the global-batch loss'. Ours by default ("global") gives exactly the 1-process gradient;
`ddp_dice="v1"` reproduces v1's backward.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unetpp_lib.nn.losses import deep_supervision_loss, soft_dice_loss

WORLD, LOCAL_B, C, S = 2, 2, 3, (6, 5, 4)
WEIGHTS = [0.0, 1 / 3, 2 / 3]  # three heads; the first weighted 0, as UNet++'s X(0,1)
MODES = ("global", "v1")


class TinyHeads(torch.nn.Module):
    """A conv trunk with three 1x1x1 heads at full resolution (what the loss sees of UNet++)."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.mid = torch.nn.Conv3d(4, 4, 3, padding=1)
        self.heads = torch.nn.ModuleList(torch.nn.Conv3d(4, C, 1, bias=False) for _ in WEIGHTS)

    def forward(self, x):
        a = F.leaky_relu(self.trunk(x), 0.01)
        b = F.leaky_relu(self.mid(a), 0.01)
        return [self.heads[0](a), self.heads[1](b), self.heads[2](a + b)]


def _inputs(seed: int = 0):
    """Global batch: images, labels (class 2 only in rank 0's half), leaf logits per head."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * LOCAL_B, 1, *S, generator=g)
    y = torch.randint(0, 2, (WORLD * LOCAL_B, *S), generator=g)
    y[0, :2, :2, :2] = 2  # tumour present in rank 0's half only: per-rank and global Dice differ
    logits = [torch.randn(WORLD * LOCAL_B, C, *S, generator=g) * 2 for _ in WEIGHTS]
    return x, y, logits


def _flat_grads(module: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.grad.flatten() for p in module.parameters()]).numpy()


def _rank(rank: int, store: str, out: str) -> None:
    """One DDP rank: loss and averaged parameter gradients per mode; loss and logits gradients on leaf logits."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    x, y, logits = _inputs()
    mine = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    res = {}
    for mode in (*MODES, None):
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(TinyHeads())
        loss = deep_supervision_loss(model(x[mine]), y[mine], WEIGHTS, mode)
        loss.backward()
        leaves = [t[mine].clone().requires_grad_(True) for t in logits]
        leaf_loss = deep_supervision_loss(leaves, y[mine], WEIGHTS, mode)
        leaf_loss.backward()
        key = mode or "local"
        res.update({f"{key}_loss": loss.detach().numpy(), f"{key}_grads": _flat_grads(model.module),
                    f"{key}_leaf_loss": leaf_loss.detach().numpy()})
        res.update({f"{key}_leaf_grad_{i}": t.grad.numpy() for i, t in enumerate(leaves)})
    np.savez(f"{out}/rank{rank}.npz", **res)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The 2-process run's per-rank results."""
    tmp = tmp_path_factory.mktemp("ddp")
    # spawned, not forked: a fork after earlier tests have started threads (thread pools, tqdm's monitor) can copy a
    # held lock into the rank, which then waits forever (seen with test_gpu_check run before this file)
    mp.start_processes(_rank, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True, start_method="spawn")
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(WORLD)]


def _one_process(dice_scale: float = 1.0):
    """Loss and parameter gradients of one process on the global batch (Dice gradient scaled by dice_scale)."""
    x, y, _ = _inputs()
    torch.manual_seed(0)
    net = TinyHeads()
    outs = net(x)
    loss = deep_supervision_loss(outs, y, WEIGHTS)
    if dice_scale != 1.0:  # CE + Dice with the Dice gradient x scale, the value unchanged
        loss = sum(w * (F.cross_entropy(o, y) + dice_scale * soft_dice_loss(o, y) + (1 - dice_scale) *
                        soft_dice_loss(o, y).detach()) for o, w in zip(outs, WEIGHTS))
    loss.backward()
    return float(loss.detach()), _flat_grads(net)


def _v1_one_process(run_ref, tmp_path):
    """v1's DC_and_CE_loss with MultipleOutputLoss2 (its own weights) on the global batch: loss, logits gradients."""
    _, y, logits = _inputs()
    heads = []
    for i, t in enumerate(logits):
        heads.append(str(tmp_path / f"global_logits_{i}.npy"))
        np.save(heads[-1], t.numpy())
    np.save(tmp_path / "global_target.npy", y.numpy())
    ref = run_ref("ref_loss.py", cases=[{"heads": heads, "targets": [str(tmp_path / "global_target.npy")] * len(heads)}])
    np.testing.assert_allclose(WEIGHTS, ref["weights"][str(len(WEIGHTS))], rtol=1e-12)
    return ref["cases"][0]["total"], [ref.array(f"grad_0_{i}") for i in range(len(WEIGHTS))]


def test_two_ranks_equal_v1s_one_process_on_the_global_batch(ddp_runs, run_ref, tmp_path):
    """Ours ("global"): the ranks' mean loss is v1's single-process loss on the global batch, and each rank's
    logits gradient, averaged by DDP (1 / W), is v1's on that rank's slice; so the weights' gradients are one
    process's (checked on a small network)."""
    v1_loss, v1_grads = _v1_one_process(run_ref, tmp_path)
    r0, r1 = ddp_runs
    mean = (float(r0["global_leaf_loss"]) + float(r1["global_leaf_loss"])) / 2
    assert mean == pytest.approx(v1_loss, abs=1e-5)
    worst = 0.0
    for i in range(len(WEIGHTS)):
        ours = np.concatenate([r0[f"global_leaf_grad_{i}"], r1[f"global_leaf_grad_{i}"]]) / WORLD
        np.testing.assert_allclose(ours, v1_grads[i], atol=1e-7)
        worst = max(worst, float(np.abs(ours - v1_grads[i]).max()))
    loss, grads = _one_process()
    assert (float(r0["global_loss"]) + float(r1["global_loss"])) / 2 == pytest.approx(loss, abs=1e-5)
    np.testing.assert_allclose(r0["global_grads"], r1["global_grads"], atol=1e-7)  # DDP averaged
    np.testing.assert_allclose(r0["global_grads"], grads, atol=1e-5, rtol=1e-5)
    print(f"2 ranks vs v1 on the global batch: loss {abs(mean - v1_loss):.2e}, logits gradient {worst:.2e}; "
          f"weights' gradient vs one process {np.abs(r0['global_grads'] - grads).max():.2e}")
    # the old per-rank Dice really differs (the tumour is absent from rank 1): this test can fail
    local = (float(r0["local_leaf_loss"]) + float(r1["local_leaf_loss"])) / 2
    local_grad = np.concatenate([r0["local_leaf_grad_2"], r1["local_leaf_grad_2"]]) / WORLD
    print(f"per-rank Dice (old): loss off by {abs(local - v1_loss):.2e}, gradient by "
          f"{np.abs(local_grad - v1_grads[2]).max():.2e}")
    assert abs(local - v1_loss) > 1e-4 and np.abs(local_grad - v1_grads[2]).max() > 1e-5  # 100x the tolerance


def test_v1_ddp_compute_loss_matches_ours(ddp_runs, run_ref, tmp_path):
    """v1's own compute_loss, 2 gloo processes in its venv, on the same leaf logits: loss and gradients per rank."""
    _, y, logits = _inputs()
    heads, targets = [], []
    for r in range(WORLD):
        mine = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        heads.append([])
        for i, t in enumerate(logits):
            np.save(tmp_path / f"logits_{r}_{i}.npy", t[mine].numpy())
            heads[-1].append(str(tmp_path / f"logits_{r}_{i}.npy"))
        np.save(tmp_path / f"target_{r}.npy", y[mine].numpy())
        targets.append(str(tmp_path / f"target_{r}.npy"))
    ref = run_ref("ref_ddp_loss.py", heads=heads, targets=targets, weights=WEIGHTS, store=str(tmp_path / "store"))
    worst = worst_loss = 0.0
    for r in range(WORLD):
        for mode in MODES:  # the forward is the same in both modes
            assert float(ddp_runs[r][f"{mode}_leaf_loss"]) == pytest.approx(ref["loss_per_rank"][r], abs=1e-5)
            worst_loss = max(worst_loss, abs(float(ddp_runs[r][f"{mode}_leaf_loss"]) - ref["loss_per_rank"][r]))
        for i in range(len(WEIGHTS)):
            ours, theirs = ddp_runs[r][f"v1_leaf_grad_{i}"], ref.array(f"grad_{r}_{i}")
            np.testing.assert_allclose(ours, theirs, atol=1e-6)
            worst = max(worst, float(np.abs(ours - theirs).max()))
    print(f"v1 DDP compute_loss vs ours: loss {worst_loss:.2e}, logits gradient (v1 mode) {worst:.2e}")
    # v1's DDP gradient is not its own single-process one (the Dice part is 1 / W of it): "v1" mode is a choice
    _, one = _v1_one_process(run_ref, tmp_path)
    ddp = np.concatenate([ref.array("grad_0_2"), ref.array("grad_1_2")]) / WORLD
    assert np.abs(ddp - one[2]).max() > 1e-5
