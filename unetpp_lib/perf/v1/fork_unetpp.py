"""The fork's UNet++ (MrGiovanni/UNetPlusPlus, Generic_UNetPlusPlus) rebuilt from v1.6.4's own blocks, any depth.

Written from the fork's rules, not copied: encoder stages are v1 StackedConvLayers (first conv
strided by the previous pooling), the bottleneck two one-conv stacks; the nest `loc_z` holds the
nodes on the anti-diagonal i + j = L - z, node n = X(L-1-z-n, n+1), built from a stack of
(convs - 1) convs to the skip's width and a stack of one conv; its kernel is
conv_kernel_sizes[-(u + 1)] with u = z + n, i.e. the kernel of level i + 1; its transposed conv
`up_z[n]` (no bias) brings X(i+1, j-1) up by pool[i]; `seg_outputs[m]` (1x1x1, no bias) sits on
X(0, L - m). Initialised by InitWeights_He(1e-2) as the trainer does. The fork's forward spells
out L = 5; here the same anti-diagonal order runs for any L. A SegmentationNetwork, as the fork's,
so v1's predict_3D runs on it (outputs deepest head first when deep supervision is on, as the fork).
"""
import numpy as np
import torch
from nnunet.network_architecture.generic_UNet import ConvDropoutNormNonlin, StackedConvLayers
from nnunet.network_architecture.initialization import InitWeights_He
from nnunet.network_architecture.neural_network import SegmentationNetwork
from nnunet.utilities.nd_softmax import softmax_helper
from torch import nn


class ForkUNetPlusPlus(SegmentationNetwork):
    """Generic_UNetPlusPlus as nnUNetTrainerV2 builds it (3D, instance norm, no dropout, convolutional
    pooling and upsampling, deep supervision), with the nest loop generalised from five levels to L."""

    def __init__(self, in_ch, base, classes, pools, kernels, max_features=320, convs=2):
        super().__init__()
        L = len(pools)
        self.L = L
        # what SegmentationNetwork.predict_3D reads (as the fork sets them)
        self.conv_op, self.num_classes = nn.Conv3d, classes
        self.input_shape_must_be_divisible_by = np.prod(pools, 0, dtype=np.int64)
        self.inference_apply_nonlin = softmax_helper
        self._deep_supervision = self.do_ds = False
        norm = {'eps': 1e-5, 'affine': True, 'momentum': 0.1}
        drop = {'p': 0, 'inplace': True}
        act = {'negative_slope': 1e-2, 'inplace': True}

        def stack(c_in, c_out, n, kernel, first_stride=None):
            conv = {'stride': 1, 'dilation': 1, 'bias': True, 'kernel_size': kernel,
                    'padding': [1 if k == 3 else 0 for k in kernel]}
            return StackedConvLayers(c_in, c_out, n, nn.Conv3d, conv, nn.InstanceNorm3d, norm, nn.Dropout3d, drop,
                                     nn.LeakyReLU, act, first_stride, basic_block=ConvDropoutNormNonlin)

        context, c_in, c_out = [], in_ch, base
        for d in range(L):
            context.append(stack(c_in, c_out, convs, kernels[d], pools[d - 1] if d else None))
            c_in, c_out = c_out, min(int(np.round(c_out * 2)), max_features)
        context.append(nn.Sequential(stack(c_in, c_out, convs - 1, kernels[L], pools[L - 1]),
                                     stack(c_out, c_out, 1, kernels[L])))
        self.conv_blocks_context = nn.ModuleList(context)
        down = c_out
        for z in range(L):  # the fork's create_nest(z, ...)
            locs, ups, from_down = [], [], down
            for u in range(z, L):
                skip = context[-(2 + u)].output_channels
                if u == z:
                    first_skip = skip
                ups.append(nn.ConvTranspose3d(from_down, skip, pools[-(u + 1)], pools[-(u + 1)], bias=False))
                k = kernels[-(u + 1)]
                locs.append(nn.Sequential(stack(skip * (2 + u - z), skip, convs - 1, k), stack(skip, skip, 1, k)))
                from_down = skip
            setattr(self, f"loc{z}", nn.ModuleList(locs))
            setattr(self, f"up{z}", nn.ModuleList(ups))
            down = first_skip
        self.seg_outputs = nn.ModuleList(nn.Conv3d(getattr(self, f"loc{z}")[-1][-1].output_channels, classes,
                                                   1, 1, 0, 1, 1, False) for z in range(L))
        self.apply(InitWeights_He(1e-2))

    def heads(self, x):
        """Logits of every head, X(0, 1) first."""
        L, grid = self.L, {}
        grid[0, 0] = self.conv_blocks_context[0](x)
        heads = []
        for k in range(1, L + 1):
            grid[k, 0] = self.conv_blocks_context[k](grid[k - 1, 0])
            z = L - k
            for n in range(k):
                i, j = k - 1 - n, n + 1
                up = getattr(self, f"up{z}")[n](grid[i + 1, j - 1])
                grid[i, j] = getattr(self, f"loc{z}")[n](torch.cat([grid[i, c] for c in range(j)] + [up], 1))
            heads.append(self.seg_outputs[L - k](grid[0, k]))
        return heads

    def forward(self, x):
        """As the fork: the deepest head's logits, or with deep supervision all heads deepest first."""
        heads = self.heads(x)
        return tuple(heads[::-1]) if self._deep_supervision and self.do_ds else heads[-1]
