
import numpy as np
import pytest
import torch

from unetpp_lib.core import io
from unetpp_lib.nn.infer import export, gaussian_weights, lowres_axis, mirror_sets, sliding_window, tile_starts
from unetpp_lib.preprocess import preprocess_arrays
from unetpp_lib.prep.synthetic import direction_matrix


class LabelEcho(torch.nn.Module):
    """A 'network' whose logits are the input label (one-hot x 10): inference must give it back."""

    def __init__(self, classes=3):
        super().__init__()
        self.classes = classes
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, mode="deepest", level=None):
        lab = x[:, 0].round().long().clamp(0, self.classes - 1)
        return torch.nn.functional.one_hot(lab, self.classes).movedim(-1, 1).float() * 10


@pytest.mark.parametrize("size, patch", [(50, 16), (16, 16), (10, 16), (33, 8)])
def test_tiles_and_weights_cover_every_voxel(size, patch):
    starts = tile_starts(size, patch)
    covered = np.zeros(max(size, patch), bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered[:size].all() and starts[0] == 0
    if size > patch:
        assert starts[-1] == size - patch and len(starts) == int(np.ceil((size - patch) / (patch / 2))) + 1
    w = gaussian_weights([patch, 12, 9])
    assert w.min() > 0 and w.max() == 1 and w.shape == (patch, 12, 9)
    assert w[patch // 2, 6, 4] == 1  # peak on voxel patch // 2, as nnU-Net v1
    assert len(mirror_sets((0, 1, 2))) == 8 and mirror_sets(()) == [()]


def label_volume(shape=(20, 40, 36)):
    lab = np.zeros(shape, np.uint8)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    lab[((zz - 10) / 7) ** 2 + ((yy - 20) / 14) ** 2 + ((xx - 15) / 10) ** 2 < 1] = 1
    lab[((zz - 9) / 3) ** 2 + ((yy - 22) / 4) ** 2 + ((xx - 14) / 4) ** 2 < 1] = 2
    return lab


@pytest.mark.parametrize("kind", ["identity", "flip_xy", "flip_z", "oblique"])
@pytest.mark.parametrize("spacing", [(1.0, 0.8, 0.8), (0.8, 0.8, 3.0)])  # the second: x coarsest -> transposed
def test_inference_path_is_lossless_and_keeps_geometry(tmp_path, kind, spacing):
    lab = label_volume()
    img = np.zeros((26, 46, 42), np.float32)  # zero frame: the crop and the paste-back are exercised
    img[3:23, 3:43, 3:39] = lab + 0.001  # nonzero inside, values = the label
    geom = io.Geometry(img.shape, spacing, (-120.5, 80.25, -300.0),
                       tuple(direction_matrix(kind, np.random.default_rng(0)).ravel()))
    full_lab = np.zeros(img.shape, np.uint8)
    full_lab[3:23, 3:43, 3:39] = lab
    src = io.write_image(tmp_path / "image.nii.gz", img, geom)
    geom = io.read_image(src)[1]  # as stored (float32 header)
    order = [int(np.argmax(geom.spacing))] + [i for i in range(3) if i != int(np.argmax(geom.spacing))]
    plans = {"transpose_forward": order, "target_spacing": [geom.spacing[i] for i in order],
             "normalization": {"clip": [-1e9, 1e9], "mean": 0.0, "std": 1.0},
             "resampling": {"image_order": 3, "label_order": 1}}
    arr, _, props = preprocess_arrays(img, None, geom.spacing, plans)
    props["geometry"] = geom
    assert props["crop_box"] == [[3, 23], [3, 43], [3, 39]]
    probs = sliding_window(LabelEcho(), torch.from_numpy(arr)[None], [8, 16, 16], 3, step=0.5)
    assert torch.allclose(probs.sum(0), torch.ones(()), atol=1e-5)  # probabilities, not logits
    out = export(probs, props, tmp_path / "pred.nii.gz")
    seg, g = io.read_image(out)
    assert np.array_equal(seg, full_lab)  # lossless: same voxels...
    assert g == geom  # ...same spacing, origin, direction
    nib = pytest.importorskip("nibabel")
    np.testing.assert_allclose(nib.load(out).affine, nib.load(src).affine, atol=1e-5)


def test_anisotropic_export_resamples_back_to_the_original_grid(tmp_path):
    lab = label_volume((12, 60, 60))
    img = lab.astype(np.float32) + 0.001
    geom = io.Geometry(img.shape, (4.0, 0.75, 0.75), (0.0, 0.0, 0.0), tuple(np.diag([-1.0, -1.0, 1.0]).ravel()))
    plans = {"transpose_forward": [0, 1, 2], "target_spacing": [2.0, 1.0, 1.0],
             "normalization": {"clip": [-1e9, 1e9], "mean": 0.0, "std": 1.0},
             "resampling": {"image_order": 3, "label_order": 1}}
    arr, _, props = preprocess_arrays(img, None, geom.spacing, plans)
    props["geometry"] = geom
    assert arr.shape == (24, 45, 45)
    probs = sliding_window(LabelEcho(), torch.from_numpy(arr)[None], [8, 16, 16], 3, mirror_axes=(2,))
    seg, g = io.read_image(export(probs, props, tmp_path / "p.nii.gz"))
    assert g == geom and seg.shape == lab.shape
    for c in (1, 2):
        dice = 2 * ((seg == c) & (lab == c)).sum() / ((seg == c).sum() + (lab == c).sum())
        assert dice > 0.9, c


def test_lowres_axis_follows_v1_rule():
    assert lowres_axis((5.0, 0.8, 0.8), (2.5, 1.0, 1.0)) == 0  # the original spacing decides first
    assert lowres_axis((0.8, 0.8, 4.0), (1.0, 1.0, 1.0)) == 2
    assert lowres_axis((2.0, 1.0, 1.0), (1.0, 1.0, 3.5)) == 2  # else the network's spacing
    assert lowres_axis((1.0, 0.8, 0.8), (1.0, 1.0, 1.0)) is None


def test_compiled_forward_matches_eager_with_one_graph():
    """Compiled (inductor, as `--compile`) and eager probabilities agree; the short last batch is padded, so one
    graph serves every batch, and a second network of the architecture reuses it."""
    from torch._dynamo.utils import counters

    from unetpp_lib import plan
    from unetpp_lib.nn.model import build_model

    plans = plan.apply_overrides(plan.task03_plans(), {"patch_size": [16, 16, 16], "base_num_features": 2,
                                                       "max_num_features": 8})
    img = torch.randn(1, 20, 24, 18, generator=torch.Generator().manual_seed(0))  # 8 tiles: batches of 3, 3, 2
    graphs = counters["stats"]["unique_graphs"]
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_model(plans).eval()
        eager, timed = sliding_window(net, img, [16, 16, 16], 3, tile_batch=3), {}
        compiled = sliding_window(net, img, [16, 16, 16], 3, tile_batch=3, compile=True, timings=timed)
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
        assert timed["tiles"] == 8 * 8 and timed["network"] > 0
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_channels_last_tiles_give_the_same_probabilities_and_a_slow_case_shows_its_tiles(capsys, monkeypatch):
    from unetpp_lib.nn import infer
    from unetpp_lib.nn.model import build_model

    plans = {"num_input_channels": 1, "num_classes": 3, "patch_size": [8, 16, 16], "pool_op_kernel_sizes": [[1, 2, 2]],
             "conv_kernel_sizes": [[1, 3, 3], [3, 3, 3]], "base_num_features": 4, "max_num_features": 320}
    torch.manual_seed(0)
    net = build_model(plans).eval()
    image = torch.randn(1, 12, 30, 30)
    first = sliding_window(net, image, [8, 16, 16], 3, mirror_axes=(2,))
    monkeypatch.setattr(infer, "TILE_BAR_DELAY", 0.0)
    net = net.to(memory_format=torch.channels_last_3d)
    second = sliding_window(net, image, [8, 16, 16], 3, mirror_axes=(2,), channels_last=True, desc="case_1 tiles")
    torch.testing.assert_close(second, first, atol=1e-5, rtol=1e-4)
    err = capsys.readouterr().err
    assert "case_1 tiles" in err and "/36 " in err and "tile/s" in err  # 18 tiles x 2 mirrorings, with a rate
    assert "\x1b[A" not in err  # no cursor moves of nested bars
