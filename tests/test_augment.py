import math

import pytest
import torch

from unetpp_lib.nn.augment import (AugmentConfig, augment_batch, enlarged_size, intensity, mirror, spatial,
                                   spatial_params)
from unetpp_lib.nn.losses import IGNORE

NEVER = dict(p_rotation=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
             p_gamma_inverted=0, p_gamma=0, p_mirror=0)


def phantom(B=4, E=(24, 40, 40)):
    """Label: a ball (1) with an off-centre ball (2); image: a smooth function of the label."""
    zz, yy, xx = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in E], indexing="ij")
    c = [n / 2 for n in E]
    lab = torch.zeros(E, dtype=torch.long)
    lab[((zz - c[0]) / 8) ** 2 + ((yy - c[1]) / 12) ** 2 + ((xx - c[2]) / 12) ** 2 < 1] = 1
    lab[((zz - c[0]) / 4) ** 2 + ((yy - c[1] - 5) / 4) ** 2 + ((xx - c[2] + 4) / 4) ** 2 < 1] = 2
    img = lab.float() * 100.0
    return img.expand(B, 1, *E).clone(), lab.expand(B, *E).clone()


def agreement(img, lab) -> float:
    """Share of labelled voxels whose image value rounds to their label (100 per class)."""
    valid = lab != IGNORE
    return float(((img[:, 0] / 100).round().long() == lab)[valid].float().mean())


def test_enlarged_size():
    assert enlarged_size([128, 128, 128]) == [206, 206, 206]  # nnU-Net's 205, crop offset kept whole
    assert enlarged_size([16, 64, 64]) == [54, 102, 76]  # nnU-Net's [53, 102, 75]
    assert enlarged_size([16, 64, 64], AugmentConfig(dummy_2d=True)) == [16, 76, 76]


@pytest.mark.parametrize("which", ["rotation", "scale", "both"])
def test_spatial_keeps_image_and_label_aligned(which):
    cfg = AugmentConfig(**{**NEVER, "p_rotation": 1.0 if which != "scale" else 0,
                           "p_scale": 1.0 if which != "rotation" else 0})
    img, lab = phantom()
    mats = spatial_params(4, cfg, torch.Generator().manual_seed(3))
    assert not torch.allclose(mats, torch.eye(3).expand_as(mats))
    out_img, out_lab = spatial(img, lab, (16, 24, 24), mats, num_classes=3)
    assert out_img.shape == (4, 1, 16, 24, 24) and out_lab.shape == (4, 16, 24, 24)
    assert agreement(out_img, out_lab) > 0.97  # only partial-volume edges differ
    assert (out_lab == 1).any() and (out_lab == 2).any()


def test_untouched_samples_are_an_exact_centre_crop():
    img, lab = phantom(B=2)
    out_img, out_lab = spatial(img, lab, (16, 24, 24), torch.eye(3).expand(2, 3, 3), 3)
    assert torch.equal(out_img, img[:, :, 4:20, 8:32, 8:32]) and torch.equal(out_lab, lab[:, 4:20, 8:32, 8:32])


def test_rotation_turns_the_label():
    img, lab = phantom(B=1, E=(24, 40, 40))
    mats = torch.tensor([[[1.0, 0, 0], [0, math.cos(math.pi / 2), -math.sin(math.pi / 2)],
                          [0, math.sin(math.pi / 2), math.cos(math.pi / 2)]]])
    _, out = spatial(img, lab, (24, 40, 40), mats, 3)
    assert torch.equal(out[0].transpose(1, 2).flip(1) == 2, lab[0] == 2) or \
        torch.equal(out[0].transpose(1, 2).flip(2) == 2, lab[0] == 2)  # 90 degrees in-plane


def test_mirror_flips_both_exactly():
    img, lab = phantom(B=3)
    cfg = AugmentConfig(**{**NEVER, "p_mirror": 1.0})
    out_img, out_lab = mirror(img.clone(), lab.clone(), cfg, torch.Generator())
    assert torch.equal(out_lab, lab.flip([1, 2, 3])) and torch.equal(out_img, img.flip([2, 3, 4]))


def test_intensity_transforms_change_values_not_geometry():
    img, lab = phantom(B=8)
    img = img + torch.randn_like(img)
    cfg = AugmentConfig(**{**NEVER, "p_noise": 1, "p_blur": 1, "p_brightness": 1, "p_contrast": 1,
                           "p_lowres": 1, "p_gamma": 1})
    out = intensity(img.clone(), cfg, torch.Generator().manual_seed(0))
    assert out.shape == img.shape and torch.isfinite(out).all() and not torch.allclose(out, img)
    fg = lab[:, None] > 0  # structures stay where they were: still brighter inside than outside
    assert all(out[b][fg[b]].mean() > out[b][~fg[b]].mean() + 30 for b in range(8))


def test_augment_batch_default_probabilities_keep_alignment():
    img, lab = phantom(B=16)
    out_img, out_lab = augment_batch(img, lab, (16, 24, 24), 3, AugmentConfig(p_noise=0, p_blur=0, p_brightness=0,
                                     p_contrast=0, p_lowres=0, p_gamma=0, p_gamma_inverted=0),
                                     torch.Generator().manual_seed(1))
    assert out_img.shape == (16, 1, 16, 24, 24) and agreement(out_img, out_lab) > 0.97
