"""Training augmentation, batched in torch on the training device (nnU-Net v1 "moreDA", no elastic).

The loader delivers an enlarged box (v1's size: 206^3 for a 128^3 patch, where v1 loads 205^3)
so that rotation and scaling rarely pull in padding; `spatial` maps it to the patch
with one `grid_sample` per batch. Probabilities, ranges, per-sample/per-channel draws
and the order of the transforms are v1.6.4's `get_moreDA_augmentation` with
batchgenerators 0.21 (tests/parity/test_augment_parity.py runs both). Random
parameters come from a CPU `torch.Generator` (reproducible, resumable); the noise
fields from the device's default generator.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .losses import IGNORE

# v1 sizes the loaded box before setup_DA_params widens the scale range from (0.85, 1.25) to (0.7, 1.4)
BOX_MIN_SCALE = 0.85


@dataclass
class AugmentConfig:
    """Probabilities (per sample unless named per channel) and ranges of every transform."""

    rotation_deg: float = 30.0  # per axis, each angle drawn on its own
    rotation_deg_2d: float = 180.0  # dummy 2D: in-plane only, v1's 2D range
    p_rotation: float = 0.2
    scale: tuple = (0.7, 1.4)  # isotropic; half the draws below 1, half above
    p_scale: float = 0.2
    noise_sigma: tuple = (0.0, 0.1)  # batchgenerators names it noise_variance but uses it as the sigma
    p_noise: float = 0.1
    blur_sigma: tuple = (0.5, 1.0)  # voxels, drawn per channel
    p_blur: float = 0.2
    p_blur_channel: float = 0.5
    brightness: tuple = (0.75, 1.25)  # multiplier, drawn per channel
    p_brightness: float = 0.15
    contrast: tuple = (0.75, 1.25)  # per channel, clipped to the channel's former range
    p_contrast: float = 0.15
    lowres_zoom: tuple = (0.5, 1.0)  # per channel: nearest down, cubic up
    p_lowres: float = 0.25
    p_lowres_channel: float = 0.5
    gamma: tuple = (0.7, 1.5)  # per channel; half the draws below 1
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    p_mirror: float = 0.5  # per axis
    dummy_2d: bool = False  # anisotropic plans: rotate and scale in-plane only, no low resolution along axis 0


def enlarged_size(patch, cfg: AugmentConfig | None = None) -> list[int]:
    """Loaded box (voxels) for a patch: v1's get_patch_size, plus 1 where needed so that (box - patch) is even.

    v1 turns the vector of patch sizes by the largest angle (at most 90 deg) about each axis in
    turn, keeps the largest extent per axis and divides by the smallest scale; dummy 2D does this
    in-plane only. The even margin keeps centre crops whole (128 -> 206 where v1 loads 205).
    """
    cfg = cfg or AugmentConfig()
    deg = min(90.0, cfg.rotation_deg_2d if cfg.dummy_2d else cfg.rotation_deg)
    vec = torch.tensor([float(p) for p in patch], dtype=torch.float64)
    box = vec.clone()
    for axis in [0] if cfg.dummy_2d else [0, 1, 2]:
        angles = torch.zeros(1, 3, dtype=torch.float64)
        angles[0, axis] = math.radians(deg)
        box = torch.maximum(box, (rotation_matrix(angles)[0] @ vec).abs())
    box = box / BOX_MIN_SCALE
    if cfg.dummy_2d:
        box[0] = vec[0]  # slices are not enlarged
    return [int(b) + (int(b) - int(p)) % 2 for b, p in zip(box.tolist(), patch)]


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) maps of output offsets to input offsets for (B, 3) angles (radians) about array axes 0, 1, 2.

    batchgenerators' rotate_coords_3d(coords, angle_x, angle_y, angle_z) with angle_x about array
    axis 0: it multiplies the coordinate rows by Rx Ry Rz, i.e. input = (Rx Ry Rz)^T output.
    """
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    r0 = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    r1 = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    r2 = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return (r0 @ r1 @ r2).transpose(1, 2)


def _half_below_one(shape, rng: tuple, gen: torch.Generator) -> torch.Tensor:
    """batchgenerators' draw for scale, contrast and gamma: U(lo, 1) or U(max(lo, 1), hi), each with p 0.5."""
    low = (torch.rand(shape, generator=gen) < 0.5) & (rng[0] < 1)
    u = torch.rand(shape, generator=gen)
    hi_lo = max(rng[0], 1.0)
    return torch.where(low, rng[0] + u * (1 - rng[0]), hi_lo + u * (rng[1] - hi_lo))


def spatial_params(batch: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, 3) matrices (z, y, x) mapping output voxel offsets to input offsets; identity if untouched."""
    rot = torch.rand(batch, generator=gen) < cfg.p_rotation
    deg = cfg.rotation_deg_2d if cfg.dummy_2d else cfg.rotation_deg
    angles = (torch.rand(batch, 3, generator=gen) * 2 - 1) * math.radians(deg)
    if cfg.dummy_2d:
        angles[:, 1:] = 0  # rotate within the slice plane only
    angles = angles * rot[:, None]
    sc = torch.rand(batch, generator=gen) < cfg.p_scale
    factor = torch.where(sc, _half_below_one(batch, cfg.scale, gen), torch.ones(batch))
    scale = torch.diag_embed(factor[:, None].expand(batch, 3).clone())
    if cfg.dummy_2d:
        scale[:, 0, 0] = 1.0
    return rotation_matrix(angles) @ scale  # sample a region of size patch * factor: < 1 zooms in


def spatial(img: torch.Tensor, lab: torch.Tensor, patch, mats: torch.Tensor, num_classes: int):
    """Rotate/scale and crop (B, C, *E) image and (B, *E) label to `patch`; padding -> 0 and IGNORE.

    The output centre maps to the input centre (E - 1) / 2; image trilinear, label linear per class.
    """
    E = img.shape[2:]
    patch = [int(p) for p in patch]
    eye = torch.eye(3).expand_as(mats)
    moved = ~torch.isclose(mats, eye).flatten(1).all(1)
    lo = [(e - p) // 2 for e, p in zip(E, patch)]
    crop = tuple(slice(a, a + p) for a, p in zip(lo, patch))
    out_img = img[(slice(None), slice(None)) + crop].clone()
    out_lab = lab[(slice(None),) + crop].clone()
    if moved.any():
        idx = torch.nonzero(moved).flatten().to(img.device)
        inv_in = torch.diag(1 / torch.tensor(E, dtype=torch.float32))
        theta = inv_in @ mats[moved] @ torch.diag(torch.tensor(patch, dtype=torch.float32))  # grid_sample's units
        theta = theta.flip(1).flip(2)  # grid_sample wants (x, y, z)
        theta = torch.cat([theta, torch.zeros(len(theta), 3, 1)], 2).to(img.device)
        grid = F.affine_grid(theta, [len(theta), 1, *patch], align_corners=False)
        sub = img.index_select(0, idx).float()
        warped = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out_img[idx] = warped.to(img.dtype)
        out_lab[idx] = _warp_label(lab.index_select(0, idx).long(), grid, num_classes).to(lab.dtype)
    return out_img, out_lab


def _warp_label(lab: torch.Tensor, grid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *patch) labels of (B, *E) ones at `grid`, by batchgenerators' rule for linear label interpolation.

    Each label's indicator is interpolated (IGNORE ranks lowest, as -1 sorts first); the largest label
    reaching 0.5 wins, background where none does; outside the input IGNORE.
    """
    onehot = F.one_hot(torch.where(lab == IGNORE, 0, lab + 1), num_classes + 1)  # channel 0: IGNORE, c + 1: c
    onehot = onehot.movedim(-1, 1).float()
    warped = F.grid_sample(onehot, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rank = torch.arange(num_classes + 1, device=lab.device).view(1, -1, *([1] * (warped.dim() - 2)))
    top = torch.where(warped >= 0.5, rank, -1).amax(1)
    cls = torch.where(top < 0, 0, top - 1)  # top 0 -> IGNORE (-1), top c + 1 -> c
    return torch.where(warped.sum(1) < 0.5, IGNORE, cls)  # outside: ignored (v1: background, same in the loss)


def _per_sample(batch: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Boolean mask: which samples get a transform."""
    return torch.rand(batch, generator=gen) < p


def _uniform(shape, rng: tuple, gen: torch.Generator) -> torch.Tensor:
    """Uniform values in a range."""
    return rng[0] + torch.rand(shape, generator=gen) * (rng[1] - rng[0])


def _bcast(v: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) or per-channel (B, C) values shaped to broadcast over (B, C, D, H, W), on the image's device."""
    return v.reshape(*v.shape, *([1] * (img.dim() - v.dim()))).to(img.device, img.dtype)


def _reflect_index(n: int, r: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by r on both sides, mirrored about the edges (scipy's 'reflect')."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(vol: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter of one (D, H, W) volume: kernel to 4 sigma, edges mirrored."""
    r = int(4 * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * x**2 / sigma**2)
    k = (k / k.sum()).to(vol.device, vol.dtype)
    out = vol[None, None]
    for axis in range(3):
        out = out.index_select(axis + 2, _reflect_index(out.shape[axis + 2], r, vol.device))
        shape = [1, 1, 1]
        shape[axis] = -1
        out = F.conv3d(out, k.view(1, 1, *shape))
    return out[0, 0]


@functools.lru_cache(maxsize=512)
def _resize_matrix(n_in: int, n_out: int, order: int) -> torch.Tensor:
    """(n_out, n_in) operator of a 1-D spline resize as skimage.transform.resize does it (edge mode, no antialias)."""
    from scipy import ndimage  # the kit's dependency; one small operator per size pair, cached

    w = ndimage.zoom(np.eye(n_in), (1, n_out / n_in), order=order, mode="nearest", grid_mode=True)
    assert w.shape == (n_in, n_out), (w.shape, n_in, n_out)
    return torch.from_numpy(np.ascontiguousarray(w.T))


def _resize(vol: torch.Tensor, size, order: int) -> torch.Tensor:
    """Separable spline resize of one (D, H, W) volume (order 0 nearest, 3 cubic), clipped to its range as skimage."""
    out = vol
    for axis, n in enumerate(size):
        w = _resize_matrix(out.shape[axis], int(n), order).to(vol.device, vol.dtype)
        out = torch.movedim(torch.tensordot(w, out, dims=([1], [axis])), 0, axis)
    return out.clamp(vol.min(), vol.max())


def simulate_lowres(vol: torch.Tensor, zoom: float, keep_axis0: bool = False) -> torch.Tensor:
    """batchgenerators' low-resolution simulation on one (D, H, W) volume: nearest down by `zoom`, cubic up."""
    small = [int(round(s * zoom)) for s in vol.shape]  # Python's round is numpy's (half to even)
    if keep_axis0:
        small[0] = vol.shape[0]
    return _resize(_resize(vol, small, 0), vol.shape, 3)


def gamma(vol: torch.Tensor, g: float, invert: bool) -> torch.Tensor:
    """batchgenerators 0.21's gamma (retain_stats) on one channel, quirk included.

    After the gamma it re-centres to the old mean and only then divides by the new std, so the mean
    comes out scaled by old std / new std (fixed in later batchgenerators; v1.6.4 trained with this).
    """
    x = -vol if invert else vol
    mean, std = x.mean(), x.std(unbiased=False)
    lo, rng = x.min(), x.max() - x.min()
    x = ((x - lo) / (rng + 1e-7)) ** g * (rng + 1e-7) + lo
    x = (x - x.mean() + mean) / (x.std(unbiased=False) + 1e-8) * std
    return -x if invert else x


def _per_channel_apply(img: torch.Tensor, on: torch.Tensor, fn, *params: torch.Tensor) -> torch.Tensor:
    """Apply fn(volume, *param values) to every (b, c) volume where on[b, c]; (B, C) masks and params."""
    for b, c in torch.nonzero(on).tolist():
        img[b, c] = fn(img[b, c], *[float(p[b, c]) for p in params])
    return img


def _contrast(vol: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale deviations from the mean by `factor`, clipped to the former range (preserve_range)."""
    m = vol.mean()
    return ((vol - m) * factor + m).clamp(vol.min(), vol.max())


def intensity(img: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low resolution and gamma, in v1's order, on (B, C, D, H, W)."""
    B, C = img.shape[:2]
    img = img.float()
    sd = _uniform(B, cfg.noise_sigma, gen) * _per_sample(B, cfg.p_noise, gen)  # one sigma per sample
    img = img + torch.randn_like(img) * _bcast(sd, img)
    on = _per_sample(B, cfg.p_blur, gen)[:, None] & (torch.rand(B, C, generator=gen) < cfg.p_blur_channel)
    img = _per_channel_apply(img, on, gaussian_blur, _uniform((B, C), cfg.blur_sigma, gen))
    on = _per_sample(B, cfg.p_brightness, gen)[:, None]
    img = img * _bcast(torch.where(on, _uniform((B, C), cfg.brightness, gen), torch.ones(B, C)), img)
    on = _per_sample(B, cfg.p_contrast, gen)[:, None].expand(B, C)
    img = _per_channel_apply(img, on, _contrast, _half_below_one((B, C), cfg.contrast, gen))
    on = _per_sample(B, cfg.p_lowres, gen)[:, None] & (torch.rand(B, C, generator=gen) < cfg.p_lowres_channel)
    lowres = functools.partial(simulate_lowres, keep_axis0=cfg.dummy_2d)
    img = _per_channel_apply(img, on, lowres, _uniform((B, C), cfg.lowres_zoom, gen))
    for p, invert in ((cfg.p_gamma_inverted, True), (cfg.p_gamma, False)):
        on = _per_sample(B, p, gen)[:, None].expand(B, C)
        g = _half_below_one((B, C), cfg.gamma, gen)
        img = _per_channel_apply(img, on, functools.partial(gamma, invert=invert), g)
    return img


def mirror(img: torch.Tensor, lab: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator):
    """Flip each sample along each spatial axis with probability p_mirror."""
    flips = torch.rand(img.shape[0], 3, generator=gen) < cfg.p_mirror
    for b in range(img.shape[0]):
        axes = [a for a in range(3) if flips[b, a]]
        if axes:
            img[b] = img[b].flip([a + 1 for a in axes])
            lab[b] = lab[b].flip(axes)
    return img, lab


def augment_batch(img: torch.Tensor, lab: torch.Tensor, patch, num_classes: int, cfg: AugmentConfig,
                  gen: torch.Generator):
    """All transforms on a loaded (B, C, *enlarged) image and (B, *enlarged) label; returns patch-sized ones."""
    mats = spatial_params(img.shape[0], cfg, gen)
    img, lab = spatial(img, lab, patch, mats, num_classes)
    img = intensity(img, cfg, gen)
    return mirror(img, lab, cfg, gen)


def centre_crop(img: torch.Tensor, lab: torch.Tensor, patch):
    """The central patch of an enlarged batch (validation: no augmentation)."""
    E = img.shape[2:]
    crop = tuple(slice((e - p) // 2, (e - p) // 2 + p) for e, p in zip(E, patch))
    return img[(slice(None), slice(None)) + crop], lab[(slice(None),) + crop]
