"""The network: the fork's UNet++ rebuilt from v1.6.4's blocks (tests/parity/ref/ref_network.py) vs ours.

The reference initialises its own weights (InitWeights_He as the trainer); they are renamed onto
`model.UNetPlusPlus` by `fork_names.fork_to_kit` (which must cover every weight), the same input
goes through both, and every head's logits and every weight's gradient of sum_j <head_j, g_j> are
compared. Three plans: Task03's (isotropic, five poolings, at a small patch), the demo's
(anisotropic first level, three poolings) and an anisotropic Task03-like plan whose decoder
kernels differ by level, where a wrong decoder kernel rule changes the parameter count.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unetpp_lib.nn.fork_names import fork_to_kit, kit_to_fork
from unetpp_lib.nn.model import UNetPlusPlus, UNetPPConfig, count_parameters

from .conftest import call_ref

ANISO_POOLS = [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
ANISO_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
PLANS = {  # name -> (config, input size, batch)
    "task03": (UNetPPConfig(1, 3, [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, base_features=32), (64, 32, 32), 1),
    "demo": (UNetPPConfig(1, 3, [[1, 2, 2], [2, 2, 2], [2, 2, 2]], [[1, 3, 3]] + [[3, 3, 3]] * 3, base_features=8),
             (16, 48, 48), 2),
    "anisotropic": (UNetPPConfig(1, 3, ANISO_POOLS, ANISO_KERNELS, base_features=32), (16, 32, 32), 1),
}
ORIGINAL_PARAMS_ANISOTROPIC = 45_204_352  # the fork's Generic_UNetPlusPlus on this plan (issue 21)


def _case(name: str, tmp_path) -> dict:
    """The reference's arguments for one plan: shapes, seed, an input and one weight tensor per head."""
    cfg, size, batch = PLANS[name]
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    np.save(tmp_path / f"x_{name}.npy", x.numpy())
    heads = []
    for j in range(cfg.depth):
        heads.append(str(tmp_path / f"g_{name}_{j}.npy"))
        np.save(heads[-1], torch.randn(batch, cfg.num_classes, *size, generator=g).numpy())
    return {"pools": cfg.pool_op_kernel_sizes, "kernels": cfg.conv_kernel_sizes, "base": cfg.base_features,
            "max": cfg.max_features, "classes": cfg.num_classes, "in_channels": cfg.in_channels,
            "convs": cfg.conv_per_stage, "seed": 7, "x": str(tmp_path / f"x_{name}.npy"), "g": heads}


@pytest.fixture(scope="module")
def ref(ref_python, tmp_path_factory):
    """One reference run for the three plans: (result, its folder, its arguments)."""
    tmp = tmp_path_factory.mktemp("network")
    args = {"cases": [_case(n, tmp) for n in PLANS]}
    result = call_ref(ref_python, "ref_network.py", tmp / "out", args, timeout=900)
    return result, result.out, args


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/parity/conftest.py)


def test_anisotropic_plan_has_the_originals_parameter_count(ref):
    result, _, _ = ref
    with torch.device("meta"):
        net = UNetPlusPlus(PLANS["anisotropic"][0])
    assert result["cases"][2]["params"] == ORIGINAL_PARAMS_ANISOTROPIC  # the reference is the fork
    assert count_parameters(net) == ORIGINAL_PARAMS_ANISOTROPIC


@pytest.mark.parametrize("k, name", list(enumerate(PLANS)))
def test_heads_and_gradients_equal_the_forks(ref, k, name):
    result, out, args = ref
    cfg, _, _ = PLANS[name]
    net = UNetPlusPlus(cfg)
    theirs = dict(np.load(out / f"state_{k}.npz"))
    mapped = fork_to_kit(theirs, cfg)
    assert set(mapped) == set(net.state_dict())  # every weight of ours comes from one of theirs
    assert {kk: v.shape for kk, v in mapped.items()} == {kk: tuple(v.shape) for kk, v in net.state_dict().items()}
    net.load_state_dict({kk: torch.from_numpy(v) for kk, v in mapped.items()})
    assert count_parameters(net) == result["cases"][k]["params"]
    case = args["cases"][k]
    heads = net(torch.from_numpy(np.load(case["x"])), mode="all")
    worst_out = 0.0
    for j, h in enumerate(heads, 1):
        expect = np.load(out / f"out_{k}_{j}.npy")
        worst_out = max(worst_out, float(np.abs(h.detach().numpy() - expect).max()))
        np.testing.assert_allclose(h.detach().numpy(), expect, atol=2e-5, rtol=1e-4, err_msg=f"head X(0,{j})")
    sum((h * torch.from_numpy(np.load(p))).sum() for h, p in zip(heads, case["g"])).backward()
    grads = kit_to_fork({n: p.grad.numpy() for n, p in net.named_parameters()}, cfg)
    expect = np.load(out / f"grad_{k}.npz")
    # one scale for all: a conv bias feeding an instance norm has a true gradient of 0, so its float noise is
    # judged against the network's gradients, not against itself
    scale = max(float(np.abs(expect[n]).max()) for n in expect.files)
    worst_grad = max(float(np.abs(grads[n] - expect[n]).max()) for n in expect.files) / scale
    for n in expect.files:
        np.testing.assert_allclose(grads[n], expect[n], atol=1e-5 * scale, rtol=1e-3, err_msg=n)
    print(f"network parity {name}: {count_parameters(net):,} parameters, heads max |diff| {worst_out:.1e}, "
          f"gradients max |diff| / max |grad| {worst_grad:.1e}")


def test_old_decoder_kernel_rule_would_fail(ref):
    """Level i's own kernel on the decoder nodes (the kit's rule before issue 21) gives other shapes on the
    anisotropic plans: the renamed weights no longer fit."""
    result, out, _ = ref
    cfg = PLANS["anisotropic"][0]
    theirs = fork_to_kit(dict(np.load(out / "state_2.npz")), cfg)
    old = UNetPlusPlus(cfg)
    for i in range(cfg.depth):
        for j in range(1, cfg.depth + 1 - i):
            kernel = cfg.conv_kernel_sizes[i]
            for block in old.nodes[f"x_{i}_{j}"]:
                conv = block[0]
                block[0] = torch.nn.Conv3d(conv.in_channels, conv.out_channels, kernel, 1, [k // 2 for k in kernel])
    assert count_parameters(old) == 43_877_248  # the count of the old rule
    with pytest.raises(RuntimeError, match="size mismatch"):
        old.load_state_dict({kk: torch.from_numpy(v) for kk, v in theirs.items()})
