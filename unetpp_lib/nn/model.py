"""3D UNet++ (nested U-Net) built from the plans, any depth.

Zhou, Rahman Siddiquee, Tajbakhsh, Liang: "UNet++: A Nested U-Net Architecture for
Medical Image Segmentation" (DLMIA 2018) and "UNet++: Redesigning Skip Connections to
Exploit Multiscale Features in Image Segmentation" (IEEE TMI 2019).

Node X(i, j) sits at resolution level i and column j; tensors and modules are named as
in the paper's grid (`x_0_3`). X(i, 0) is the encoder: two blocks of conv ->
InstanceNorm3d -> LeakyReLU, level i > 0 starting with a strided conv. X(i, j), j >= 1,
convolves the concatenation of X(i, 0..j-1) and the transposed-conv upsampling of
X(i+1, j-1), with the kernel of level i + 1 (as the original). A 1x1x1 head on each X(0, j) gives full-resolution logits.

    >>> net = UNetPlusPlus(UNetPPConfig(1, 3, [[2, 2, 2]] * 2, [[3, 3, 3]] * 3, base_features=4))
    >>> [t.shape for t in net(torch.zeros(1, 1, 16, 16, 16), mode="all")]
    [torch.Size([1, 3, 16, 16, 16]), torch.Size([1, 3, 16, 16, 16])]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

HEAD_MODES = ("deepest", "average", "pruned", "all")
# raised when the network a plan builds changes; 2: decoder nodes take the kernel of level i + 1, as the original
# (issue 21). Checkpoints record it; probes are cached per architecture.
ARCHITECTURE = 2


@dataclass
class UNetPPConfig:
    """Network shape; `config_from_plans` fills it from plans.json."""

    in_channels: int
    num_classes: int
    pool_op_kernel_sizes: list  # per pooling: stride per axis
    conv_kernel_sizes: list  # per level (depth + 1): kernel per axis
    base_features: int = 32
    max_features: int = 320
    conv_per_stage: int = 2

    @property
    def depth(self) -> int:
        """Number of poolings L; heads sit on X(0, 1) ... X(0, L)."""
        return len(self.pool_op_kernel_sizes)

    def features(self, level: int) -> int:
        """Channels at a level: base * 2^level, capped."""
        return min(self.base_features * 2 ** level, self.max_features)


def config_from_plans(plans: dict) -> UNetPPConfig:
    """Network configuration from plans.json."""
    return UNetPPConfig(plans["num_input_channels"], plans["num_classes"], plans["pool_op_kernel_sizes"],
                        plans["conv_kernel_sizes"], plans["base_num_features"], plans["max_num_features"],
                        plans.get("conv_per_stage", 2))


class ConvBlock(nn.Sequential):
    """Conv3d (bias) -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01)."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1):
        pad = [k // 2 for k in kernel]
        super().__init__(nn.Conv3d(c_in, c_out, kernel, stride, pad, bias=True),
                         nn.InstanceNorm3d(c_out, eps=1e-5, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


def node(c_in: int, c_out: int, kernel, n_blocks: int, stride=1) -> nn.Sequential:
    """A grid node: `n_blocks` conv blocks, the first possibly strided."""
    return nn.Sequential(ConvBlock(c_in, c_out, kernel, stride),
                         *[ConvBlock(c_out, c_out, kernel) for _ in range(n_blocks - 1)])


class UNetPlusPlus(nn.Module):
    """3D UNet++ with a head on every X(0, j); see the module docstring for the grid."""

    def __init__(self, cfg: UNetPPConfig):
        super().__init__()
        self.cfg = cfg
        L, F, K = cfg.depth, cfg.features, cfg.conv_kernel_sizes
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i in range(L + 1):
            stride = cfg.pool_op_kernel_sizes[i - 1] if i else 1
            self.nodes[f"x_{i}_0"] = node(cfg.in_channels if i == 0 else F(i - 1), F(i), K[i], cfg.conv_per_stage, stride)
        for j in range(1, L + 1):
            for i in range(L + 1 - j):
                pool = cfg.pool_op_kernel_sizes[i]
                self.ups[f"up_{i + 1}_{j - 1}"] = nn.ConvTranspose3d(F(i + 1), F(i), pool, pool, bias=False)
                # as the fork's create_nest (and v1's Generic_UNet): a decoder node takes the kernel of the
                # level below it, conv_kernel_sizes[-(u + 1)]; it differs from level i's on anisotropic plans
                self.nodes[f"x_{i}_{j}"] = node((j + 1) * F(i), F(i), K[i + 1], cfg.conv_per_stage)
        self.heads = nn.ModuleList(nn.Conv3d(F(0), cfg.num_classes, 1, bias=False) for _ in range(L))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, mode: str = "all", level: int | None = None):
        """Logits (B, classes, D, H, W).

        mode: `all` (list of every head, X(0,1) first: training), `deepest` (X(0,L)),
        `average` (mean of all heads: the paper's accurate mode), `pruned` (only the
        sub-network up to X(0, level): the paper's fast mode).
        """
        L = self.cfg.depth
        depth = L if mode != "pruned" else int(level if level is not None else L)
        if not 1 <= depth <= L:
            raise ValueError(f"pruned level {level} outside 1..{L}")
        if mode not in HEAD_MODES:
            raise ValueError(f"head mode {mode!r}: use one of {HEAD_MODES}")
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(depth + 1):
            grid[i, 0] = self.nodes[f"x_{i}_0"](x if i == 0 else grid[i - 1, 0])
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                up = self.ups[f"up_{i + 1}_{j - 1}"](grid[i + 1, j - 1])
                grid[i, j] = self.nodes[f"x_{i}_{j}"](torch.cat([grid[i, k] for k in range(j)] + [up], dim=1))
        if mode == "all":
            return [self.heads[j - 1](grid[0, j]) for j in range(1, L + 1)]
        if mode == "average":
            return torch.stack([self.heads[j - 1](grid[0, j]) for j in range(1, L + 1)]).mean(0)
        return self.heads[depth - 1](grid[0, depth])


def divisor(cfg: UNetPPConfig) -> list[int]:
    """Per axis, what an input size must divide by (the product of the poolings)."""
    out = [1, 1, 1]
    for kernel in cfg.pool_op_kernel_sizes:
        out = [o * k for o, k in zip(out, kernel)]
    return out


def forward_padded(net: UNetPlusPlus, x: torch.Tensor, mode: str = "deepest", level: int | None = None):
    """Run on any spatial size: zero-pad (B, C, D, H, W) up to the divisor, crop the logits back."""
    size = x.shape[2:]
    pad = [(-n) % d for n, d in zip(size, divisor(net.cfg))]
    xp = torch.nn.functional.pad(x, [v for p in reversed(pad) for v in (0, p)])
    out = net(xp, mode=mode, level=level)
    crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in size)
    return [o[crop] for o in out] if isinstance(out, list) else out[crop]


def init_weights(m: nn.Module) -> None:
    """He initialisation for LeakyReLU(0.01), zero biases (as nnU-Net)."""
    if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(m.weight, a=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def load_weights(net: UNetPlusPlus, state: dict, source: str) -> None:
    """Load a state dict, explaining a shape mismatch from a checkpoint of the kit's earlier network."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise ValueError(f"{source}: its weights do not fit the network its plans build now; a checkpoint trained "
                         f"before architecture {ARCHITECTURE} (decoder kernels as the original, issue 21) differs on "
                         f"anisotropic plans: train this fold again (continue_training: false)") from None


def build_model(plans: dict) -> UNetPlusPlus:
    """UNet++ for a plans.json."""
    return UNetPlusPlus(config_from_plans(plans))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(cfg: UNetPPConfig, patch, mode: str = "all", level: int | None = None) -> int:
    """Multiply-adds of one forward pass on a (1, C, *patch) input, counted on a weightless copy."""
    with torch.device("meta"):
        model = UNetPlusPlus(cfg)
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        k = mod.weight.shape
        if isinstance(mod, nn.ConvTranspose3d):  # each input voxel scatters into a kernel-sized block
            total += inp[0][0].numel() * k[1] * k[2] * k[3] * k[4]
        else:
            total += out[0].numel() * k[1] * k[2] * k[3] * k[4]

    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, cfg.in_channels, *patch, device="meta"), mode=mode, level=level)
    return total


def config_dict(model: UNetPlusPlus) -> dict:
    """JSON-ready network configuration (for checkpoint sidecars)."""
    return asdict(model.cfg)
