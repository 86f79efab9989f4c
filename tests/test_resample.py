import numpy as np
import pytest
from scipy import ndimage

from unetpp_lib.prep.resample import axis_orders, resample_axis, resample_image, resample_label


@pytest.mark.parametrize("shape, new", [((33, 34, 35), (20, 50, 41)), ((10, 40, 40), (25, 31, 47))])
def test_cubic_matches_ndimage_zoom_inside(shape, new):
    """Separable B-spline == scipy's 3D order-3 zoom (grid mode) away from the borders."""
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.normal(size=shape), 2).astype(np.float32) * 100
    ours = resample_image(x, new, (1, 1, 1), (1, 1, 1), order=3)
    ref = ndimage.zoom(x, np.array(new) / np.array(shape), order=3, mode="nearest", grid_mode=True)
    assert ours.shape == tuple(new)
    inner = tuple(slice(3, -3) for _ in new)
    assert np.abs(ours - ref)[inner].max() < 1e-3 * np.abs(x).max()


def test_orders_and_identity():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert resample_axis(x, 4, 2, 3) is x  # same size: untouched
    up = resample_axis(x, 8, 2, 0)
    assert np.array_equal(up[..., ::2], x) and np.array_equal(up[..., 1::2], x)  # nearest doubles
    lin = resample_axis(np.array([[[0.0, 10.0]]], np.float32), 4, 2, 1)
    assert np.allclose(lin, [[[0.0, 2.5, 7.5, 10.0]]])
    with pytest.raises(ValueError, match="order 2"):
        resample_axis(x, 5, 2, 2)


def test_anisotropic_uses_nearest_along_the_coarse_axis():
    assert axis_orders((5.0, 0.8, 0.8), (2.0, 0.8, 0.8), 3) == [0, 3, 3]
    assert axis_orders((1.0, 0.8, 0.8), (1.0, 0.7, 0.7), 3) == [3, 3, 3]
    x = np.zeros((4, 8, 8), np.float32)
    x[2:] = 100.0  # a step between slices
    up = resample_image(x, (10, 8, 8), (5.0, 0.8, 0.8), (2.0, 0.8, 0.8))
    assert set(np.unique(up)) == {0.0, 100.0}  # no values made up between slices


def test_label_keeps_every_class_and_its_volume():
    lab = np.zeros((30, 60, 60), np.uint8)
    zz, yy, xx = np.mgrid[:30, :60, :60]
    lab[((zz - 15) / 12) ** 2 + ((yy - 30) / 25) ** 2 + ((xx - 30) / 25) ** 2 < 1] = 1
    lab[((zz - 15) / 3) ** 2 + ((yy - 30) / 4) ** 2 + ((xx - 36) / 4) ** 2 < 1] = 2
    spacing_in, spacing_out = (2.0, 0.7, 0.7), (1.5, 0.9, 0.9)
    new = [round(n * s / t) for n, s, t in zip(lab.shape, spacing_in, spacing_out)]
    out = resample_label(lab, new, spacing_in, spacing_out)
    assert out.dtype == np.uint8 and out.shape == tuple(new)
    assert set(np.unique(out)) == {0, 1, 2}
    for cls in (1, 2):
        before = (lab == cls).sum() * np.prod(spacing_in)
        after = (out == cls).sum() * np.prod(spacing_out)
        assert abs(after - before) / before < 0.05, cls
