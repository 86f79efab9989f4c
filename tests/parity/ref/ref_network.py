"""The fork's UNet++ (fork_unetpp.py) on a few plans: initial weights, every head's logits, gradients.

args: cases, each {pools, kernels, base, max, classes, in_channels, convs, seed, x (.npy or null), g (.npy per
head or null)}. Per case k: result {params, names}; state_k.npz (initial weights, the fork's names); when x is
given: out_k_j.npy (logits of head X(0, j), j = 1..L) and grad_k.npz (d sum_j <out_j, g_j> / d weights).
"""
import numpy as np
import torch

import _ref

a = _ref.args()
from fork_unetpp import ForkUNetPlusPlus  # noqa: E402


torch.set_num_threads(1)
results = []
for k, case in enumerate(a["cases"]):
    torch.manual_seed(case["seed"])
    net = ForkUNetPlusPlus(case["in_channels"], case["base"], case["classes"], case["pools"], case["kernels"],
                           case["max"], case["convs"])
    state = {n: t.detach().numpy() for n, t in net.state_dict().items()}
    np.savez(f"{a['out']}/state_{k}.npz", **state)
    results.append({"params": sum(p.numel() for p in net.parameters()), "names": list(state)})
    if case.get("x"):
        heads = net.heads(torch.from_numpy(np.load(case["x"])))
        g = [torch.from_numpy(np.load(p)) for p in case["g"]]
        sum((h * w).sum() for h, w in zip(heads, g)).backward()
        for j, h in enumerate(heads, 1):
            _ref.save_array(a, f"out_{k}_{j}", h.detach().numpy())
        np.savez(f"{a['out']}/grad_{k}.npz", **{n: p.grad.numpy() for n, p in net.named_parameters()})
_ref.done(a, {"cases": results})
