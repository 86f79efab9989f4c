"""Uncertainty at inference (issue 24): the extra channel the sliding window accumulates, the maps export writes.

The accumulation is checked against a reference that keeps every softmax copy (each mirroring of each tile) and
averages them afterwards; the maps against hand-made probabilities with known entropy and spread; the written maps
against the segmentation's exact geometry (flipped and oblique directions, crop box, transposed axes).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from unetpp_lib.core import io
from unetpp_lib.core.layout import UNCERTAINTY_KINDS, PredLayout
from unetpp_lib.nn.infer import (entropy, export, gaussian_weights, mirror_sets, pad_to_patch, sliding_window,
                                 tile_starts, uncertainty_maps)
from unetpp_lib.preprocess import preprocess_arrays
from unetpp_lib.prep.synthetic import direction_matrix


class Wobbly(torch.nn.Module):
    """A small random convolution: its softmax differs between mirrorings and between overlapping tiles."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, classes, 3, padding=1)

    def forward(self, x, mode="deepest", level=None):
        return self.conv(x) * 3


def every_copy(net, image, patch, classes, axes):
    """(mean probabilities, weighted mean entropy) from every (tile, mirroring) softmax kept whole, then averaged."""
    img, crop = pad_to_patch(image, patch)
    starts = list(itertools.product(*[tile_starts(n, p, 0.5) for n, p in zip(img.shape[1:], patch)]))
    w = gaussian_weights(patch) if len(starts) > 1 else torch.ones(tuple(patch))
    copies = []
    for st in starts:
        box = tuple(slice(s, s + p) for s, p in zip(st, patch))
        for flip in mirror_sets(axes):
            dims = [d + 2 for d in flip]
            x = img[(slice(None),) + box][None]
            y = torch.softmax(net(x.flip(dims) if dims else x).float(), 1)
            copies.append((box, (y.flip(dims) if dims else y)[0]))
    num = torch.zeros((classes, *img.shape[1:]))
    ent = torch.zeros(img.shape[1:])
    den = torch.zeros(img.shape[1:])
    for box, y in copies:
        num[(slice(None),) + box] += w * y
        ent[box] += w * entropy(y)
        den[box] += w
    return (num / den)[crop], (ent / den)[crop[1:]]


@torch.no_grad()
def test_accumulated_entropy_equals_the_mean_over_every_kept_copy():
    torch.manual_seed(1)
    image = torch.randn(1, 13, 30, 27)
    net = Wobbly().eval()
    plain = sliding_window(net, image, [8, 16, 16], 3, mirror_axes=(1, 2))
    both = sliding_window(net, image, [8, 16, 16], 3, mirror_axes=(1, 2), uncertainty=True)
    assert both.shape == (4, 13, 30, 27)
    assert torch.equal(both[:3], plain)  # the probabilities are untouched
    ref_p, ref_h = every_copy(net, image, [8, 16, 16], 3, (1, 2))
    torch.testing.assert_close(both[:3], ref_p, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[3], ref_h, atol=1e-5, rtol=1e-4)
    spread = entropy(both[:3]) - both[3]
    assert spread.min() > -1e-5 and spread.max() > 0.01  # the copies disagree somewhere, never "negatively"


def test_maps_of_hand_made_probabilities():
    one_hot = torch.tensor([1.0, 0.0, 0.0])
    uniform = torch.full((3,), 1 / 3)
    split = torch.tensor([0.5, 0.5, 0.0])  # the mean of [1, 0, 0] and [0, 1, 0]: certain copies that disagree
    p = torch.stack([one_hot, uniform, split, split], 1)[:, :, None, None]  # (3 classes, 4 voxels, 1, 1)
    mean_h = torch.tensor([0.0, math.log(3), 0.0, math.log(2)])[:, None, None]  # the last: copies agree
    m = {k: v.flatten().tolist() for k, v in uncertainty_maps(p, mean_h).items()}
    assert m["entropy"] == [0, 100, 63, 63]  # ln 2 / ln 3 = 0.631
    assert m["spread"] == [0, 0, 63, 0]
    assert m["confidence"] == [100, 33, 50, 50]
    assert all(v.dtype == torch.uint8 for v in uncertainty_maps(p, mean_h).values())


@pytest.mark.parametrize("kind", ["flip_xy", "oblique"])
def test_exported_maps_have_the_segmentations_geometry(tmp_path, kind):
    shape, spacing = (20, 44, 40), (0.8, 0.8, 3.0)  # x coarsest: the network's axes are transposed
    img = np.zeros(shape, np.float32)
    img[2:18, 4:40, 3:37] = np.random.default_rng(0).normal(size=(16, 36, 34)).astype(np.float32)  # a zero frame
    geom = io.Geometry(shape, spacing, (-10.0, 4.5, 30.0),
                       tuple(direction_matrix(kind, np.random.default_rng(0)).ravel()))
    geom = io.read_image(io.write_image(tmp_path / "image.nii.gz", img, geom))[1]
    order = [2, 0, 1]
    plans = {"transpose_forward": order, "target_spacing": [geom.spacing[i] for i in order],
             "normalization": {"clip": [-1e9, 1e9], "mean": 0.0, "std": 1.0},
             "resampling": {"image_order": 3, "label_order": 1}}
    arr, _, props = preprocess_arrays(img, None, geom.spacing, plans)
    props["geometry"] = geom
    probs = sliding_window(Wobbly().eval(), torch.from_numpy(arr)[None], [8, 16, 16], 3, mirror_axes=(0,),
                           uncertainty=True)
    out = PredLayout(tmp_path / "pred")
    seg_path = export(probs, props, out.case("c"), maps_to=out)
    plain = export(probs[:3], props, tmp_path / "plain.nii.gz")
    seg, g = io.read_image(seg_path)
    assert g == geom and np.array_equal(seg, io.read_image(plain)[0])  # the same segmentation with or without
    maps = {}
    for k in UNCERTAINTY_KINDS:
        maps[k], gk = io.read_image(out.uncertainty("c", k))
        assert gk == geom and maps[k].dtype == np.uint8 and maps[k].max() <= 100
    inside = np.zeros(shape, bool)
    inside[2:18, 4:40, 3:37] = True
    assert (maps["entropy"][~inside] == 0).all() and (maps["confidence"][~inside] == 100).all()
    assert maps["entropy"][inside].max() > 20 and (maps["spread"] <= maps["entropy"]).all()
    # where the predicted class is barely ahead, the entropy is high: confidence and entropy agree voxel by voxel
    low = inside & (maps["confidence"] < 50)
    assert low.any() and maps["entropy"][low].min() > maps["entropy"][inside & (maps["confidence"] > 95)].max()
