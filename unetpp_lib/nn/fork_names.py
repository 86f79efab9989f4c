"""The nnU-Net v1 UNet++ fork's parameter names and the kit's (`model.UNetPlusPlus`), both ways.

The fork (MrGiovanni/UNetPlusPlus, `Generic_UNetPlusPlus`) names its modules by pathway:
`conv_blocks_context[d]` is the encoder node X(d, 0) (the bottleneck X(L, 0) as two stacks of
convs - 1 and one conv), `loc{z}[n]` the decoder node X(L-1-z-n, n+1) on the anti-diagonal
i + j = L - z (again two stacks), `up{z}[n]` its transposed conv from X(i+1, j-1), and
`seg_outputs[m]` the head on X(0, L - m). `fork_to_kit` renames a fork state dict to
`model.UNetPlusPlus`'s names; nothing else differs (same convs, norms and shapes).
"""
from __future__ import annotations

import re

from .model import UNetPPConfig


def _blocks(prefix: str, convs: int, split: bool) -> list[str]:
    """The fork's prefixes of a node's conv blocks, in order (one stack, or two when `split`)."""
    if not split:
        return [f"{prefix}.blocks.{b}" for b in range(convs)]
    return [f"{prefix}.0.blocks.{b}" for b in range(convs - 1)] + [f"{prefix}.1.blocks.0"]


def fork_names(cfg: UNetPPConfig) -> dict[str, str]:
    """Fork parameter-name prefix -> kit prefix, for every conv block, transposed conv and head."""
    L, n = cfg.depth, cfg.conv_per_stage
    names: dict[str, str] = {}
    for d in range(L + 1):
        for b, fork in enumerate(_blocks(f"conv_blocks_context.{d}", n, split=d == L)):
            names[fork] = f"nodes.x_{d}_0.{b}"
    for z in range(L):
        for k in range(L - z):
            i, j = L - 1 - z - k, k + 1
            for b, fork in enumerate(_blocks(f"loc{z}.{k}", n, split=True)):
                names[fork] = f"nodes.x_{i}_{j}.{b}"
            names[f"up{z}.{k}"] = f"ups.up_{i + 1}_{j - 1}"
        names[f"seg_outputs.{z}"] = f"heads.{L - 1 - z}"
    return names


_LEAF = {"conv.weight": "0.weight", "conv.bias": "0.bias", "instnorm.weight": "1.weight", "instnorm.bias": "1.bias"}


def fork_to_kit(state: dict, cfg: UNetPPConfig) -> dict:
    """The fork's state dict under the kit's names; refuses keys it does not know and reports missing ones."""
    prefixes = fork_names(cfg)
    out, unknown = {}, []
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # instance norm without running statistics: the fork never fills them
        m = re.match(r"(.*?)\.(conv\.weight|conv\.bias|instnorm\.weight|instnorm\.bias)$", key)
        if m and m.group(1) in prefixes:
            out[f"{prefixes[m.group(1)]}.{_LEAF[m.group(2)]}"] = value
        elif key.endswith(".weight") and key[:-7] in prefixes:
            out[f"{prefixes[key[:-7]]}.weight"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} weights the fork's UNet++ of depth {cfg.depth} does not have "
                         f"(first: {unknown[:3]}); is this checkpoint from another network (a plain U-Net, "
                         f"another depth)?")
    return out


def kit_to_fork(state: dict, cfg: UNetPPConfig) -> dict:
    """The inverse renaming: kit names -> the fork's names (for comparing gradients and writing fork checkpoints)."""
    back = {}
    for fork, kit in fork_names(cfg).items():
        if kit.startswith(("ups.", "heads.")):
            back[f"{kit}.weight"] = f"{fork}.weight"
        else:
            for leaf_fork, leaf_kit in _LEAF.items():
                back[f"{kit}.{leaf_kit}"] = f"{fork}.{leaf_fork}"
    return {back[k]: v for k, v in state.items()}
