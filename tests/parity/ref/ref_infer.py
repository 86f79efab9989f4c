"""v1's sliding-window pieces: Gaussian map, tile starts, and predict_3D (tiled, Gaussian, mirroring) of a tiny net."""
import _ref

a = _ref.args()
_ref.cpu_only()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from nnunet.network_architecture.neural_network import SegmentationNetwork  # noqa: E402
from nnunet.utilities.nd_softmax import softmax_helper  # noqa: E402


class TinyNet(SegmentationNetwork):
    """The test's two-conv net (same layer names, so the same state_dict) as a v1 SegmentationNetwork."""

    def __init__(self, channels, classes, features):
        super().__init__()
        self.conv_op, self.num_classes, self.inference_apply_nonlin = nn.Conv3d, classes, softmax_helper
        self.body = nn.Sequential(nn.Conv3d(channels, features, 3, padding=1), nn.LeakyReLU(0.01),
                                  nn.Conv3d(features, classes, 3, padding=1))

    def forward(self, x):
        return self.body(x)  # logits: v1 applies inference_apply_nonlin (softmax) itself


result = {"gaussians": [], "steps": []}
for i, patch in enumerate(a["gaussian_patches"]):
    _ref.save_array(a, f"gaussian_{i}", SegmentationNetwork._get_gaussian(patch, sigma_scale=1. / 8))
for size, patch, step in a["step_cases"]:
    result["steps"].append(SegmentationNetwork._compute_steps_for_sliding_window((patch,), (size,), step)[0])

net = TinyNet(**a["net"])
net.load_state_dict(torch.load(a["weights"]))
net.eval()
for i, run in enumerate(a["runs"]):
    x = np.load(run["image"])
    seg, probs = net.predict_3D(x, do_mirroring=bool(run["mirror_axes"]), mirror_axes=tuple(run["mirror_axes"]),
                                use_sliding_window=True, step_size=0.5, patch_size=tuple(run["patch"]),
                                use_gaussian=True, all_in_gpu=False, verbose=False, mixed_precision=False)
    _ref.save_array(a, f"probs_{i}", probs)
    _ref.save_array(a, f"seg_{i}", seg)
_ref.done(a, result)
