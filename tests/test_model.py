import pytest
import torch

from unetpp_lib.nn.losses import deep_supervision_loss, head_weights
from unetpp_lib.nn.model import (UNetPlusPlus, UNetPPConfig, count_macs, count_parameters, divisor, forward_padded)

TASK03 = UNetPPConfig(1, 3, [[2, 2, 2]] * 5, [[3, 3, 3]] * 6)


def tiny(depth=2, pools=None, base=4) -> UNetPlusPlus:
    pools = pools or [[2, 2, 2]] * depth
    return UNetPlusPlus(UNetPPConfig(1, 3, pools, [[3, 3, 3]] * (len(pools) + 1), base_features=base))


def test_task03_parameter_count_and_cost():
    with torch.device("meta"):
        net = UNetPlusPlus(TASK03)
    assert count_parameters(net) == 45_966_784  # as the original Generic_UNetPlusPlus
    assert count_macs(TASK03, [128, 128, 128]) == pytest.approx(2.374e12, rel=1e-3)
    assert [TASK03.features(i) for i in range(6)] == [32, 64, 128, 256, 320, 320]
    assert "x_0_5" in net.nodes and "x_5_0" in net.nodes and "x_1_4" in net.nodes and "x_1_5" not in net.nodes


@pytest.mark.parametrize("pools, size", [
    ([[2, 2, 2]] * 2, (33, 34, 35)),
    ([[1, 2, 2], [2, 2, 2], [1, 2, 2]], (9, 35, 30)),  # anisotropic plan, depth 3
    ([[2, 2, 2]], (7, 8, 9)),  # depth 1
])
def test_output_shapes_for_odd_sizes_and_depths(pools, size):
    net = tiny(pools=pools)
    x = torch.randn(2, 1, *size)
    outs = forward_padded(net, x, mode="all")
    assert len(outs) == len(pools) and all(o.shape == (2, 3, *size) for o in outs)
    assert forward_padded(net, x).shape == (2, 3, *size)
    assert forward_padded(net, x, mode="average").shape == (2, 3, *size)
    for k in range(1, len(pools) + 1):
        assert forward_padded(net, x, mode="pruned", level=k).shape == (2, 3, *size)
    assert divisor(net.cfg) == [int(torch.tensor([p[a] for p in pools]).prod()) for a in range(3)]


def test_head_modes_agree_with_the_grid():
    net = tiny(depth=3).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        heads = net(x, mode="all")
        assert torch.allclose(net(x, mode="deepest"), heads[-1])
        assert torch.allclose(net(x, mode="average"), torch.stack(heads).mean(0), atol=1e-6)
        assert torch.allclose(net(x, mode="pruned", level=1), heads[0], atol=1e-6)  # X(0,1) needs only X(0,0), X(1,0)
    with pytest.raises(ValueError, match="pruned level 4"):
        net(x, mode="pruned", level=4)
    with pytest.raises(ValueError, match="head mode"):
        net(x, mode="fast")


@pytest.mark.parametrize("scheme", ["exponential", "equal"])
def test_every_weight_gets_a_gradient(scheme):
    """The original's bug was a loss on X(0,1) only: 0.64 % of weights learned. Here all do."""
    net = tiny(depth=3)
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.randint(0, 3, (2, 16, 16, 16))
    weights = head_weights(3, scheme)
    deep_supervision_loss(net(x), y, weights).backward()
    zero = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if scheme == "equal":
        assert zero == []
    else:  # 8:4:2:1:0 weighs the shallowest head 0: only its own 1x1 conv learns nothing
        assert weights[0] == 0 and zero == ["heads.0.weight"]


def test_weights_of_the_earlier_decoder_rule_are_refused_with_the_fix():
    """A checkpoint of the kit's network before issue 21 (decoder kernels of level i) on an anisotropic plan."""
    from unetpp_lib.nn.model import load_weights

    cfg = UNetPPConfig(1, 3, [[1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], base_features=4)
    net = UNetPlusPlus(cfg)
    state = net.state_dict()
    assert tuple(state["nodes.x_0_1.0.0.weight"].shape[2:]) == (3, 3, 3)  # level 1's kernel, as the original
    old = {k: (v[:, :, 1:2] if k.startswith("nodes.x_0_") and k.endswith("0.weight") and v.dim() == 5
               and k != "nodes.x_0_0.0.0.weight" and k != "nodes.x_0_0.1.0.weight" else v) for k, v in state.items()}
    with pytest.raises(ValueError, match="train this fold again"):
        load_weights(UNetPlusPlus(cfg), old, "fold_0 (final checkpoint)")
    load_weights(UNetPlusPlus(cfg), state, "fold_0")  # the current network's own weights load
