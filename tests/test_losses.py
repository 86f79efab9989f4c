import math

import pytest
import torch

from unetpp_lib.nn.losses import IGNORE, dc_ce_loss, head_weights, pseudo_dice, soft_dice_loss, tp_fp_fn


def logits_for(target: torch.Tensor, classes: int = 3, strength: float = 20.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(target.clamp_min(0), classes).movedim(-1, 1).float() * strength


def test_soft_dice_on_known_masks():
    t = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    t[0, :2] = 1
    t[0, 0, 0, 0] = 2
    assert soft_dice_loss(logits_for(t), t).item() == pytest.approx(-1.0, abs=1e-4)  # perfect
    wrong = torch.zeros_like(t)  # predicts background everywhere
    assert soft_dice_loss(logits_for(wrong), t).item() == pytest.approx(0.0, abs=1e-3)
    half = t.clone()
    half[0, 1] = 0  # half the liver found (15 of 31 voxels), tumour perfect
    assert soft_dice_loss(logits_for(half), t).item() == pytest.approx(-(2 * 15 / (2 * 15 + 16) + 1) / 2, abs=1e-3)


def test_ignored_voxels_do_not_count():
    t = torch.ones(1, 4, 4, 4, dtype=torch.long)
    pred = logits_for(t)
    t_ign = t.clone()
    t_ign[0, 0] = IGNORE
    pred[0, :, 0] = logits_for(torch.zeros(1, 1, 4, 4, dtype=torch.long))[0, :, 0]  # wrong where ignored
    assert dc_ce_loss(pred, t_ign).item() < dc_ce_loss(pred, t).item()
    assert dc_ce_loss(pred, t_ign).item() == pytest.approx(dc_ce_loss(logits_for(t), t).item(), abs=5e-3)


def test_head_weights():
    assert head_weights(5) == pytest.approx([0, 1 / 15, 2 / 15, 4 / 15, 8 / 15])
    assert head_weights(1) == [1.0] and head_weights(4, "equal") == [0.25] * 4
    with pytest.raises(ValueError):
        head_weights(3, "linear")


def test_pseudo_dice_counts():
    t = torch.tensor([[[[0, 1, 1, 2]]]])
    p = torch.tensor([[[[1, 1, 0, 0]]]])
    counts = tp_fp_fn(logits_for(p), t)
    assert counts[:, 0].tolist() == [1, 1, 1] and counts[:, 1].tolist() == [0, 0, 1]
    d = pseudo_dice(counts)
    assert d[0] == pytest.approx(0.5) and d[1] == 0.0
    assert math.isnan(pseudo_dice(torch.zeros(3, 1))[0])


def test_dice_sync_outside_ddp_is_the_local_dice():
    t = torch.tensor([[[[0, 1, 1, 2]]]])
    x = torch.randn(1, 3, 1, 1, 4, generator=torch.Generator().manual_seed(0))
    assert soft_dice_loss(x, t, sync="global").item() == soft_dice_loss(x, t).item()  # no process group: one rank
    with pytest.raises(ValueError, match="dice sync"):
        soft_dice_loss(x, t, sync="mean")
