"""Loss: v1's DC_and_CE_loss ({'batch_dice': True, 'smooth': 1e-5, 'do_bg': False}, {}) and MultipleOutputLoss2 vs ours.

Our UNet++ supervises every head against the full-resolution target; v1's plain U-Net gets
targets downsampled per scale. Both losses are resolution-agnostic, so each head is compared
at its own size on its own target, and the weighted sum (with its gradient) on heads of one
size sharing one target, as ours trains.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unetpp_lib.nn.losses import dc_ce_loss, deep_supervision_loss, head_weights

C, DEPTH = 3, 4
WEIGHTS = head_weights(DEPTH)  # ours: 0, 1/7, 2/7, 4/7 (the reference computes its own, by v1's trainer)
CASES = {"all-classes": None, "no-tumour": 2, "no-liver": 1}  # the label left out of the targets


def _case(seed: int, shapes, absent: int | None):
    """Random logits per head and a label map per head (all classes present, or one class absent)."""
    g = torch.Generator().manual_seed(seed)
    logits, targets = [], []
    for s in shapes:
        logits.append(torch.randn(2, C, *s, generator=g) * 3)
        t = torch.randint(0, C, (2, *s), generator=g)
        if absent is None:
            t[0].view(-1)[:C] = torch.arange(C)  # every class surely present
        else:
            t[t == absent] = 0
        targets.append(t)
    return logits, targets


def _save(tmp_path, name: str, arrays) -> list[str]:
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(tmp_path / f"{name}_{i}.npy"))
        np.save(paths[-1], a.numpy())
    return paths


def test_loss_per_head_and_weighted_sum_match_v1(run_ref, tmp_path):
    cases, ref_cases = [], []
    for n, (name, absent) in enumerate(CASES.items()):
        # per head at several resolutions (as v1's scales), then every head at one size with one target (ours)
        multi = _case(n, [(8, 6, 5), (4, 3, 5), (2, 3, 2), (7, 7, 3)], absent)
        logits, targets = _case(10 + n, [(8, 6, 5)] * DEPTH, absent)
        full = (logits, [targets[0]] * DEPTH)
        for kind, (x, y) in (("multi", multi), ("full", full)):
            cases.append((name, kind, x, y))
            ref_cases.append({"heads": _save(tmp_path, f"l{len(cases)}", x), "targets": _save(tmp_path, f"t{len(cases)}", y)})
    ref = run_ref("ref_loss.py", cases=ref_cases, depths=[1, 2, 3, 5, 6])
    for depth in (1, 2, 3, 4, 5, 6):  # v1's own initialize, reversed to our X(0, 1)-first order
        np.testing.assert_allclose(head_weights(depth), ref["weights"][str(depth)], rtol=1e-12, err_msg=f"{depth}")
    for k, (name, kind, logits, targets) in enumerate(cases):
        theirs = ref["cases"][k]
        per_head = [float(dc_ce_loss(x, y)) for x, y in zip(logits, targets)]
        np.testing.assert_allclose(per_head, theirs["per_head"], atol=1e-5, rtol=0)
        leaves = [x.clone().requires_grad_(True) for x in logits]
        total = deep_supervision_loss(leaves, targets[0], WEIGHTS) if kind == "full" else \
            sum(w * dc_ce_loss(x, y) for x, y, w in zip(leaves, targets, WEIGHTS))
        total.backward()
        assert float(total.detach()) == pytest.approx(theirs["total"], abs=1e-5)
        grad = max(float(np.abs(x.grad.numpy() - ref.array(f"grad_{k}_{i}")).max()) for i, x in enumerate(leaves))
        assert grad < 1e-7  # gradients per voxel are ~1e-3; this is float32 rounding
        print(f"loss parity {name}/{kind}: per head {np.abs(np.subtract(per_head, theirs['per_head'])).max():.2e}, "
              f"sum {abs(float(total.detach()) - theirs['total']):.2e}, gradient {grad:.2e}")
