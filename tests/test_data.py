import numpy as np
import pytest
import torch

from unetpp_lib.prep import store
from unetpp_lib.nn.data import (PatchSampler, box_bounds, box_origin, forced_foreground, pad_to_background, rank_slice,
                                read_box)
from unetpp_lib.nn.losses import IGNORE
from unetpp_lib.preprocess import STAGE
from unetpp_lib.prep.store import sample_locations


def test_forced_foreground_share():
    assert forced_foreground(1) == [True]  # the original never forces with batch 1; we do
    assert forced_foreground(2) == [False, True]
    assert forced_foreground(3) == [False, False, True]
    assert sum(forced_foreground(12)) == 4 and forced_foreground(12)[-4:] == [True] * 4
    glob = forced_foreground(8)  # DDP: decided on the global batch, then split
    assert glob[rank_slice(8, 0, 2)] == [False] * 4 and sum(glob[rank_slice(8, 1, 2)]) == 3
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        rank_slice(8, 0, 3)


def test_read_box_pads_outside():
    arr = np.arange(4 * 5 * 6, dtype=np.float16).reshape(4, 5, 6)
    box = read_box(arr, (-1, 3, 4), (3, 4, 4), 0, np.float16)
    assert box.shape == (3, 4, 4) and (box[0] == 0).all() and box[1, 0, 0] == arr[0, 3, 4]
    lab = read_box(arr.astype(np.uint8), (10, 10, 10), (2, 2, 2), IGNORE, np.int16)
    assert (lab == IGNORE).all() and lab.dtype == np.int16


def test_foreground_samples_are_centred_on_foreground(tmp_path):
    lab = np.zeros((20, 40, 40), np.uint8)
    lab[2:5, 30:35, 30:35] = 1
    lab[3, 32, 32] = 2
    pre = tmp_path / "pre"
    store.write_case(pre / STAGE / "c.zarr", lab.astype(np.float32), lab, sample_locations(lab, 0), [8, 16, 16])
    s = PatchSampler(pre, ["c"], [8, 16, 16])
    rng = np.random.default_rng(0)
    for _ in range(10):
        _, box = s.sample(rng, foreground=True)
        assert (box > 0).any()  # the box holds foreground (centred on it, clipped at the image's lower edge)
        assert (box[:, :4] <= 0).all() and (box[:, :, :4] <= 0).all()  # y, x centred on voxels >= 30: box from >= 22
    img, labs = s.batch(rng, [False, False, True])
    assert img.shape == (3, 1, 8, 16, 16) and str(img.dtype) == "torch.float16" and labs.shape == (3, 8, 16, 16)


def test_box_bounds_keep_the_final_patch_inside():
    lo, hi = box_bounds((20, 40, 7), (12, 24, 12), (8, 16, 8))
    assert lo == [-2, -4, -3] and hi == [10, 20, -2]  # axis 2 is smaller than the patch: box nearly fixed, centred
    lo, hi = box_bounds((20, 40, 40), (11, 16, 16), (8, 16, 16))  # odd enlargement: the odd voxel goes first
    assert lo == [-2, 0, 0] and hi == [11, 24, 24]
    rng = np.random.default_rng(0)
    draws = np.array([box_origin(rng, (20, 40, 40), (12, 24, 24), (8, 16, 16)) for _ in range(400)])
    final = draws + [2, 4, 4]  # the centre crop's corner
    assert (final >= 0).all() and (final + [8, 16, 16] <= [20, 40, 40]).all()
    assert draws.min(0).tolist() == [-2, -4, -4] and draws.max(0).tolist() == [10, 20, 20]
    # a foreground centre is clipped below only: the final patch may leave the image above
    assert box_origin(rng, (20, 40, 40), (12, 24, 24), (8, 16, 16), centre=(0, 39, 20)) == [-2, 27, 8]


def test_padding_labels_become_background():
    lab = torch.tensor([[-1, 0, 1, 2, -1]], dtype=torch.int16)
    assert pad_to_background(lab).tolist() == [[0, 0, 1, 2, 0]]
