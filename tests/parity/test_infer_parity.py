"""Sliding-window inference vs nnU-Net v1's `predict_3D` (tiled, Gaussian, mirroring) with the same weights."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from unetpp_lib.nn.infer import gaussian_weights, sliding_window, tile_starts

GAUSSIAN_PATCHES = [[8, 16, 12], [9, 11, 7], [5, 6, 13], [40, 48, 56]]
# every size from the patch to 4x it, for patches even and odd: v1's rounding of each start must hold everywhere
STEP_CASES = [(size, patch, step) for patch in (5, 6, 7, 8, 12, 16, 28, 128) for step in (0.5, 0.25, 1.0)
              for size in range(patch, 4 * patch + 1, 1 if patch < 30 else 7)]  # v1 pads to >= patch first
# where i x span / (n - 1) rounds differently from v1's stride x i (one start one voxel off)
STEP_CASES += [(68, 5, 0.5), (1055, 48, 0.5), (957, 80, 0.5), (1111, 96, 0.5)]
RUNS = [  # (image shape, patch, mirror axes): y smaller than the patch (padded, odd split); odd patches; no mirroring
    {"shape": (1, 21, 13, 30), "patch": [8, 16, 12], "mirror_axes": [0, 1, 2]},
    {"shape": (1, 9, 20, 17), "patch": [9, 11, 7], "mirror_axes": [0, 2]},
    {"shape": (1, 12, 12, 12), "patch": [8, 8, 8], "mirror_axes": []},
]


class TinyNet(nn.Module):
    """Two 3x3x3 convolutions: border effects make every tile's prediction depend on where the tile sits."""

    def __init__(self, channels: int = 1, classes: int = 3, features: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(channels, features, 3, padding=1), nn.LeakyReLU(0.01),
                                  nn.Conv3d(features, classes, 3, padding=1))

    def forward(self, x, mode="deepest", level=None):
        return self.body(x)


def test_sliding_window_matches_v1(run_ref, tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():
        net.body[2].weight.mul_(4)  # confident enough that softmax and argmax are far from uniform
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    rng = np.random.default_rng(0)
    runs = []
    for i, run in enumerate(RUNS):
        np.save(tmp_path / f"image_{i}.npy", rng.normal(size=run["shape"]).astype(np.float32))
        runs.append({**run, "image": str(tmp_path / f"image_{i}.npy")})
    ref = run_ref("ref_infer.py", gaussian_patches=GAUSSIAN_PATCHES, step_cases=STEP_CASES, runs=runs,
                  weights=tmp_path / "weights.pt", net={"channels": 1, "classes": 3, "features": 4})

    for i, patch in enumerate(GAUSSIAN_PATCHES):  # the same map, float32 for float32
        np.testing.assert_allclose(gaussian_weights(patch).numpy(), ref.array(f"gaussian_{i}"), rtol=1e-6, atol=1e-7)
    ours = [tile_starts(size, patch, step) for size, patch, step in STEP_CASES]
    bad = [(c, o, r) for c, o, r in zip(STEP_CASES, ours, ref["steps"]) if o != r]
    assert not bad, f"tile starts differ (size, patch, step), ours, v1: {bad[:5]}"

    for i, run in enumerate(runs):
        x = torch.from_numpy(np.load(run["image"]))
        probs = sliding_window(net, x, run["patch"], 3, 0.5, tuple(run["mirror_axes"]), tile_batch=3).numpy()
        v1 = ref.array(f"probs_{i}")
        assert probs.shape == v1.shape == (3, *run["shape"][1:])
        assert np.abs(probs - v1).max() < 1e-4, (i, float(np.abs(probs - v1).max()))
        assert np.array_equal(probs.argmax(0), ref.array(f"seg_{i}")), i
