"""Resampling of (z, y, x) volumes to a new shape, one axis at a time.

nnU-Net resamples images with a 3D cubic B-spline (skimage `resize`, order 3): 64 taps
per output voxel, per slice when anisotropic. A tensor-product spline is separable, so
the same interpolation is done here as three 1D passes (a recursive prefilter along the
axis, then 4 taps), about 5x less work; grid alignment is skimage's / `ndimage.zoom`'s
with `grid_mode=True` (voxel centres map to voxel centres scaled about the volume).
Labels go per class through linear interpolation and a 0.5 threshold, as nnU-Net does.
For anisotropic data (max/min spacing > 3) the coarse axis is interpolated with nearest
neighbour (order 0) for image and label, the in-plane axes as above.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

ANISO_THRESHOLD = 3.0  # spacing ratio above which the coarse axis is resampled apart
PREPAD = 12  # edge samples scipy pads before the spline prefilter in 'nearest' mode


def source_positions(n_in: int, n_out: int) -> np.ndarray:
    """Input coordinate of each output voxel centre (grid mode: edges stay aligned)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _take(x: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """Gather along an axis with indices clipped to the volume (edge values repeat)."""
    return np.take(x, np.clip(idx, 0, x.shape[axis] - 1), axis=axis)


def _weights_shape(w: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshape 1D weights to broadcast along `axis`."""
    shape = [1] * ndim
    shape[axis] = -1
    return w.reshape(shape).astype(np.float32)


def resample_axis(x: np.ndarray, n_out: int, axis: int, order: int) -> np.ndarray:
    """Resample float32 `x` along one axis to `n_out` samples with spline order 0, 1 or 3."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    pos = source_positions(n_in, n_out)
    if order == 0:
        return _take(x, np.floor(pos + 0.5).astype(np.int64), axis)
    i0 = np.floor(pos).astype(np.int64)
    t = pos - i0
    if order == 1:
        w = _weights_shape(t, x.ndim, axis)
        return _take(x, i0, axis) * (1 - w) + _take(x, i0 + 1, axis) * w
    if order != 3:
        raise ValueError(f"spline order {order} not supported: use 0, 1 or 3")
    # scipy's zoom (skimage resize) has no exact 'nearest' boundary for the prefilter: it pads 12 edge
    # samples first. Doing the same makes the coefficients, hence the values near the edges, identical.
    pad = [(0, 0)] * x.ndim
    pad[axis] = (PREPAD, PREPAD)
    c = ndimage.spline_filter1d(np.pad(x, pad, mode="edge"), order=3, axis=axis, mode="nearest", output=np.float32)
    taps = [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6]
    out = _take(c, i0 - 1 + PREPAD, axis) * _weights_shape(taps[0], x.ndim, axis)
    for k in (1, 2, 3):
        out += _take(c, i0 - 1 + k + PREPAD, axis) * _weights_shape(taps[k], x.ndim, axis)
    return out


def is_anisotropic(*spacings) -> bool:
    """Whether any of the spacings has max/min above the threshold (nnU-Net's rule)."""
    return any(max(s) / min(s) > ANISO_THRESHOLD for s in spacings)


def axis_orders(spacing_in, spacing_out, order: int) -> list[int]:
    """Spline order per axis: `order`, except nearest along the coarse axis of anisotropic data."""
    orders = [order] * len(spacing_in)
    if is_anisotropic(spacing_in, spacing_out):
        src = spacing_in if max(spacing_in) / min(spacing_in) > ANISO_THRESHOLD else spacing_out
        coarse = [a for a, s in enumerate(src) if s == max(src)]
        if len(coarse) == 1:  # two equally coarse axes: v1 warns and resamples everything with `order`
            orders[coarse[0]] = 0
    return orders


def _axis_plan(shape_in, new_shape, orders) -> list[tuple[int, int, int]]:
    """(axis, n_out, order) per axis that changes, shrinking axes first so later passes touch fewer voxels."""
    axes = [a for a in range(len(shape_in)) if shape_in[a] != int(new_shape[a])]
    axes.sort(key=lambda a: int(new_shape[a]) / shape_in[a])
    return [(a, int(new_shape[a]), orders[a]) for a in axes]


def _value_range(img: np.ndarray, orders: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of the input: per slice of a nearest-resampled axis (v1 resizes those slices apart), else global."""
    coarse = [a for a, o in enumerate(orders) if o == 0]
    other = tuple(a for a in range(img.ndim) if a not in coarse)
    return img.min(axis=other, keepdims=True), img.max(axis=other, keepdims=True)


def resample_image(img: np.ndarray, new_shape, spacing_in, spacing_out, order: int = 3) -> np.ndarray:
    """Image (float32, (z, y, x)) to `new_shape`; cubic by default, coarse axis nearest when anisotropic.

    Like skimage's resize (clip=True), the result is clipped to the input's value range, per
    slice when the coarse axis is resampled apart, so spline overshoot never leaves that range.
    """
    out = img.astype(np.float32, copy=False)
    orders = axis_orders(spacing_in, spacing_out, order)
    steps = _axis_plan(img.shape, new_shape, orders)
    if not steps or order < 3:  # nearest and linear never leave the input range
        for axis, n_out, o in steps:
            out = resample_axis(out, n_out, axis, o)
        return out
    lo, hi = _value_range(out, orders)
    for axis, n_out, o in steps:
        out = resample_axis(out, n_out, axis, o)
        if o == 0:  # nearest only copies slices: their bounds follow them
            lo, hi = resample_axis(lo, n_out, axis, 0), resample_axis(hi, n_out, axis, 0)
    return np.clip(out, lo, hi, out=out)


def resample_label(lab: np.ndarray, new_shape, spacing_in, spacing_out, order: int = 1) -> np.ndarray:
    """Label (uint8) to `new_shape`: per class linear interpolation kept where >= 0.5; nearest axes last.

    Nearest-neighbour passes only copy slices, so they commute with the per-class
    threshold and run once on the uint8 result instead of once per class. A label already of
    `new_shape` comes back as it is (C-ordered: copied only when it is a view out of order).
    """
    new_shape = tuple(int(n) for n in new_shape)
    orders = axis_orders(spacing_in, spacing_out, order)
    steps = _axis_plan(lab.shape, new_shape, orders)
    smooth = [s for s in steps if s[2] != 0]
    out = lab
    if smooth:
        mid_shape = list(lab.shape)
        for axis, n_out, _ in smooth:
            mid_shape[axis] = n_out
        out = np.zeros(mid_shape, np.uint8)
        for cls in np.unique(lab):
            if cls == 0:
                continue
            ind = (lab == cls).astype(np.float32)
            for axis, n_out, o in smooth:
                ind = resample_axis(ind, n_out, axis, o)
            out[ind >= 0.5] = cls
    for axis, n_out, o in steps:
        if o == 0:
            out = _take(out, np.floor(source_positions(out.shape[axis], n_out) + 0.5).astype(np.int64), axis)
    return np.ascontiguousarray(out)
