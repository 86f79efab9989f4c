"""Training augmentation, batched in torch on the training device (nnU-Net v1 "moreDA", no elastic).

The loader delivers an enlarged patch (1.6x per axis, as nnU-Net's ~205^3 for 128^3)
so that rotation and scaling rarely pull in padding; `spatial` maps it to the patch
with one `grid_sample` per batch. Probabilities and ranges are nnU-Net v1's. Random
parameters come from a CPU `torch.Generator` (reproducible, resumable); the noise
fields from the device's default generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import IGNORE

ENLARGE = 1.6  # loaded patch / training patch, per axis


@dataclass
class AugmentConfig:
    """Probabilities (per sample) and ranges of every transform."""

    rotation_deg: float = 30.0
    p_rotation: float = 0.2
    scale: tuple = (0.7, 1.4)
    p_scale: float = 0.2
    noise_variance: tuple = (0.0, 0.1)
    p_noise: float = 0.1
    blur_sigma: tuple = (0.5, 1.0)
    p_blur: float = 0.2 * 0.5  # per sample 0.2, per channel 0.5
    brightness: tuple = (0.75, 1.25)
    p_brightness: float = 0.15
    contrast: tuple = (0.75, 1.25)
    p_contrast: float = 0.15
    lowres_zoom: tuple = (0.5, 1.0)
    p_lowres: float = 0.25 * 0.5  # per sample 0.25, per channel 0.5
    gamma: tuple = (0.7, 1.5)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    p_mirror: float = 0.5  # per axis
    dummy_2d: bool = False  # anisotropic plans: rotate and scale in-plane only


def enlarged_size(patch) -> list[int]:
    """Loaded patch size: 1.6x the patch, keeping (enlarged - patch) even so centre crops are exact."""
    out = []
    for p in patch:
        e = int(math.ceil(p * ENLARGE))
        out.append(e + (e - p) % 2)
    return out


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotation matrices from (B, 3) angles (radians) about the (z, y, x) axes."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rz = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rx = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def spatial_params(batch: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, 3) matrices (z, y, x) mapping output voxel offsets to input offsets; identity if untouched."""
    rot = torch.rand(batch, generator=gen) < cfg.p_rotation
    angles = (torch.rand(batch, 3, generator=gen) * 2 - 1) * math.radians(cfg.rotation_deg)
    if cfg.dummy_2d:
        angles[:, 1:] = 0  # rotate within the slice plane only
    angles = angles * rot[:, None]
    sc = torch.rand(batch, generator=gen) < cfg.p_scale
    factor = cfg.scale[0] + torch.rand(batch, generator=gen) * (cfg.scale[1] - cfg.scale[0])
    factor = torch.where(sc, factor, torch.ones_like(factor))
    scale = torch.diag_embed(factor[:, None].expand(batch, 3).clone())
    if cfg.dummy_2d:
        scale[:, 0, 0] = 1.0
    return _rotation(angles) @ scale  # sample a region of size patch * factor: < 1 zooms in


def spatial(img: torch.Tensor, lab: torch.Tensor, patch, mats: torch.Tensor, num_classes: int):
    """Rotate/scale and crop (B, C, *E) image and (B, *E) label to `patch`; padding -> 0 and IGNORE."""
    B, E = img.shape[0], img.shape[2:]
    patch = [int(p) for p in patch]
    eye = torch.eye(3).expand_as(mats)
    moved = ~torch.isclose(mats, eye).flatten(1).all(1)
    lo = [(e - p) // 2 for e, p in zip(E, patch)]
    crop = tuple(slice(a, a + p) for a, p in zip(lo, patch))
    out_img = img[(slice(None), slice(None)) + crop].clone()
    out_lab = lab[(slice(None),) + crop].clone()
    if moved.any():
        idx = torch.nonzero(moved).flatten().to(img.device)
        theta = torch.diag(1 / torch.tensor(E, dtype=torch.float32)) @ mats[moved] @ torch.diag(torch.tensor(patch, dtype=torch.float32))
        theta = theta.flip(1).flip(2)  # grid_sample wants (x, y, z)
        theta = torch.cat([theta, torch.zeros(len(theta), 3, 1)], 2).to(img.device)
        grid = F.affine_grid(theta, [len(theta), 1, *patch], align_corners=False)
        sub = img.index_select(0, idx).float()
        out_img[idx] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(img.dtype)
        sub_lab = lab.index_select(0, idx).long()
        onehot = F.one_hot(torch.where(sub_lab == IGNORE, num_classes, sub_lab), num_classes + 1)
        onehot = onehot.movedim(-1, 1).float()
        warped = F.grid_sample(onehot, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        cls = warped.argmax(1)
        cls = torch.where((cls == num_classes) | (warped.sum(1) < 0.5), IGNORE, cls)  # outside: ignored
        out_lab[idx] = cls.to(lab.dtype)
    return out_img, out_lab


def _per_sample(batch: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Boolean mask: which samples get a transform."""
    return torch.rand(batch, generator=gen) < p


def _uniform(batch: int, rng: tuple, gen: torch.Generator) -> torch.Tensor:
    """Per-sample uniform values in a range."""
    return rng[0] + torch.rand(batch, generator=gen) * (rng[1] - rng[0])


def _bcast(v: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Per-sample values shaped to broadcast over (B, C, D, H, W), on the image's device."""
    return v.view(-1, *([1] * (img.dim() - 1))).to(img.device, img.dtype)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one (1, C, D, H, W) volume."""
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = k / k.sum()
    c = img.shape[1]
    out = img
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = -1
        w = k.view(1, 1, *shape).repeat(c, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), w, groups=c)
    return out


def _gamma(img: torch.Tensor, g: float, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma on one volume: on [0, 1]-rescaled values, keeping mean and std."""
    x = -img if invert else img
    mean, std = x.mean(), x.std()
    lo, hi = x.min(), x.max()
    x = ((x - lo) / (hi - lo + 1e-7)) ** g * (hi - lo + 1e-7) + lo
    x = (x - x.mean()) / (x.std() + 1e-8) * std + mean
    return -x if invert else x


def intensity(img: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low resolution and gamma, in nnU-Net's order, per sample."""
    B = img.shape[0]
    img = img.float()
    on = _per_sample(B, cfg.p_noise, gen)
    sd = _uniform(B, cfg.noise_variance, gen).sqrt() * on
    img = img + torch.randn_like(img) * _bcast(sd, img)
    for b in torch.nonzero(_per_sample(B, cfg.p_blur, gen)).flatten().tolist():
        img[b:b + 1] = gaussian_blur(img[b:b + 1], float(_uniform(1, cfg.blur_sigma, gen)))
    on = _per_sample(B, cfg.p_brightness, gen)
    img = img * _bcast(torch.where(on, _uniform(B, cfg.brightness, gen), torch.ones(B)), img)
    for b in torch.nonzero(_per_sample(B, cfg.p_contrast, gen)).flatten().tolist():
        x = img[b]
        m, lo, hi = x.mean(), x.min(), x.max()
        img[b] = ((x - m) * float(_uniform(1, cfg.contrast, gen)) + m).clamp(lo, hi)
    for b in torch.nonzero(_per_sample(B, cfg.p_lowres, gen)).flatten().tolist():
        size = img.shape[2:]
        small = [max(1, int(round(s * float(_uniform(1, cfg.lowres_zoom, gen))))) for s in size]
        low = F.interpolate(img[b:b + 1], size=small, mode="nearest")
        img[b:b + 1] = F.interpolate(low, size=list(size), mode="trilinear", align_corners=False)
    for p, invert in ((cfg.p_gamma_inverted, True), (cfg.p_gamma, False)):
        for b in torch.nonzero(_per_sample(B, p, gen)).flatten().tolist():
            low_gamma = bool(torch.rand(1, generator=gen) < 0.5)
            g = _uniform(1, (cfg.gamma[0], 1.0) if low_gamma else (1.0, cfg.gamma[1]), gen)
            img[b] = _gamma(img[b], float(g), invert)
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
