"""Drawing primitives of the synthetic CT: compact patient coordinates, smooth random fields, the body frame and
filling ellipsoids, tubes and any shape inside its own box.

Coordinates stay compact arrays that broadcast to the volume (an axis the direction does not mix into a coordinate
has length 1), each smooth field is one matrix product, and a shape is evaluated inside its bounding box only, so a
case of Task03's median size (482 x 512 x 512) is drawn in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.io import Geometry



def patient_coords(geom: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-frame offsets (X left, Y posterior, Z superior; mm) of the voxels from the volume centre.

    Compact float32 arrays that broadcast to (z, y, x): an array axis the direction does not mix into a
    coordinate has length 1 (X of an unrotated case is (1, 1, x)), so full volumes are made only where needed.
    """
    d = np.array(geom.direction).reshape(3, 3)
    o = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(geom.shape[::-1], geom.spacing[::-1])]
    axes = (o[0][None, None, :], o[1][None, :, None], o[2][:, None, None])  # array x, y, z
    out = []
    for r in range(3):
        terms = [d[r, k] * axes[k] for k in range(3) if d[r, k] != 0]
        out.append(sum(terms[1:], terms[0]).astype(np.float32))
    return tuple(out)


def full_shape(u: tuple[np.ndarray, ...]) -> tuple[int, ...]:
    """The (z, y, x) shape compact coordinate arrays broadcast to."""
    return np.broadcast_shapes(*(c.shape for c in u))


def smooth_field(u: tuple[np.ndarray, ...], rng: np.random.Generator, terms: int = 4) -> np.ndarray:
    """Smooth random field in [-1, 1] from a few low-frequency sinusoids of normalised coordinates, float32."""
    shape = full_shape(u)
    xs, rest = [], []  # per term: the x-only part of the phase and the part without x
    for _ in range(terms):
        w = rng.normal(size=3) * rng.uniform(1.5, 4.0)
        phase = rng.uniform(0, 2 * np.pi)
        parts = [w[k] * u[k].astype(np.float64) for k in range(3)]
        xs.append(sum((p for p in parts if p.shape[-1] > 1), np.zeros((1, 1, 1))))
        rest.append(sum((p for p in parts if p.shape[-1] == 1), np.full((1, 1, 1), phase)))
    if any(a.shape[:-1] != (1, 1) for a in xs):  # x mixed with another array axis (no such direction here)
        return (sum(np.sin(a + b) for a, b in zip(xs, rest)) / terms).astype(np.float32)
    # sin(a + b) = sin a cos b + cos a sin b: the field is one matrix product of (z*y, 2 terms) by
    # (2 terms, x), so no sine is taken over the full volume (a float64 sine costs ~45 ns a voxel)
    zy = [np.broadcast_to(b, shape[:-1] + (1,)).reshape(-1) for b in rest]
    left = np.stack([f(b) for b in zy for f in (np.sin, np.cos)], axis=1).astype(np.float32)
    xrow = [np.broadcast_to(a, (1, 1, shape[-1])).reshape(-1) for a in xs]
    right = np.stack([f(a) for a in xrow for f in (np.cos, np.sin)], axis=0).astype(np.float32)
    f = (left @ right).reshape(shape)
    f /= terms
    return f


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """(z, y, x) slices of the smallest box holding every True voxel (empty slices when none)."""
    box = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


def _crop_one(c: np.ndarray, box: tuple[slice, ...]) -> tuple[slice, ...]:
    """Index of a compact array for a (z, y, x) box."""
    return tuple(s if n > 1 else slice(None) for s, n in zip(box, c.shape))


def _box_shape(box: tuple[slice, ...]) -> tuple[int, ...]:
    """The shape a (z, y, x) box of slices selects."""
    return tuple(s.stop - s.start for s in box)


@dataclass(frozen=True)
class Frame:
    """Body-frame coordinates (mm of the nominal patient) of a volume's voxels, as compact arrays, and its shape."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    shape: tuple[int, ...]

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> tuple[slice, ...]:
        """Index box of the voxels whose (x, y, z) may lie within [lo, hi] (empty slices when none)."""
        box = [slice(0, n) for n in self.shape]
        for c, a, b in zip((self.x, self.y, self.z), lo, hi):
            for ax, (s, n) in enumerate(zip(bounding_box((c >= a) & (c <= b)), c.shape)):
                if n > 1:
                    box[ax] = slice(max(box[ax].start, s.start), min(box[ax].stop, s.stop))
        return tuple(box)

    def crop(self, box: tuple[slice, ...]) -> "Frame":
        """The frame of a box of this volume."""
        return Frame(*(c[_crop_one(c, box)] for c in (self.x, self.y, self.z)), _box_shape(box))


def body_frame(geom: Geometry, scale: float, z_centre: float) -> Frame:
    """The frame of a geometry whose image mm are `scale` body mm and whose centre lies at body Z `z_centre`."""
    X, Y, Z = patient_coords(geom)
    return Frame(X / np.float32(scale), Y / np.float32(scale), Z / np.float32(scale) + np.float32(z_centre), geom.shape)


def ellipsoid(f: Frame, centre, axes) -> np.ndarray:
    """Normalised squared distance to an axis-aligned ellipsoid (< 1 inside)."""
    return sum(((c - m) / a) ** 2 for c, m, a in zip((f.x, f.y, f.z), centre, axes))


def segment_distance(f: Frame, p0, p1) -> np.ndarray:
    """Distance (body mm) of each voxel to the segment p0-p1."""
    d = np.subtract(p1, p0, dtype=np.float64)
    rel = [c - np.float32(p) for c, p in zip((f.x, f.y, f.z), p0)]
    t = np.clip(sum(r * np.float32(v) for r, v in zip(rel, d)) / max(float(d @ d), 1e-9), 0, 1)
    return np.sqrt(sum((r - t * np.float32(v)) ** 2 for r, v in zip(rel, d)))


def fill(img: np.ndarray, f: Frame, lo, hi, inside, value, where: np.ndarray | None = None
         ) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Set `img` to `value` (a number, or a function of the box's frame) where `inside(frame of the box)` holds (and
    `where`, a full-size mask), looking only at the box of body-mm bounds lo-hi; (box, mask in box) or None."""
    box = f.box(lo, hi)
    if any(s.stop <= s.start for s in box):
        return None
    sub = f.crop(box)
    mask = np.broadcast_to(inside(sub), sub.shape)
    if where is not None:
        mask = mask & where[_crop_one(where, box)]
    if not mask.any():
        return None
    np.copyto(img[box], value(sub) if callable(value) else np.float32(value), where=mask)
    return box, mask


def tube(img, f: Frame, p0, p1, radius: float, value, where=None):
    """Fill a cylinder of `radius` body mm around the segment p0-p1 (capped by spheres)."""
    lo = tuple(min(a, b) - radius for a, b in zip(p0, p1))
    hi = tuple(max(a, b) + radius for a, b in zip(p0, p1))
    return fill(img, f, lo, hi, lambda s: segment_distance(s, p0, p1) < radius, value, where)


def blob(img, f: Frame, centre, axes, value, where=None):
    """Fill an axis-aligned ellipsoid."""
    lo = tuple(c - a for c, a in zip(centre, axes))
    hi = tuple(c + a for c, a in zip(centre, axes))
    return fill(img, f, lo, hi, lambda s: ellipsoid(s, centre, axes) < 1, value, where)


