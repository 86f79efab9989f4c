"""Synthetic abdominal CT anatomy in Hounsfield units: body, organs, ribs, a liver of varied shape and tumours.

`draw_anatomy(geom, rng)` draws one case's image and label for a geometry (prep/synthetic.py writes them in the
MSD layout). The patient coordinates stay compact arrays that broadcast to the volume, each smooth field is one
matrix product (sin(a + b) split into x and (z, y) factors), and organs, liver and tumours are drawn inside their
bounding boxes only, so a case of Task03's median size (482 x 512 x 512) takes ~20 s.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..core.io import Geometry

TUMOUR_CONTRAST_HU = (10.0, 40.0)  # hypodense lesions: this much below the liver, as in portal-venous CT
NOISE_HU = (10.0, 20.0)  # per-case standard deviation of the quantum noise


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


def ellipsoid(u: tuple[np.ndarray, ...], centre, axes) -> np.ndarray:
    """Normalised squared distance to an axis-aligned ellipsoid (< 1 inside)."""
    return sum(((c - m) / a) ** 2 for c, m, a in zip(u, centre, axes))


def _crop(u: tuple[np.ndarray, ...], box: tuple[slice, ...]) -> tuple[np.ndarray, ...]:
    """Compact coordinates restricted to a (z, y, x) box (length-1 axes stay)."""
    return tuple(c[_crop_one(c, box)] for c in u)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """(z, y, x) slices of the smallest box holding every True voxel (empty slices when none)."""
    box = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


def draw_anatomy(geom: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image HU float32, label uint8) for one case: abdomen, liver (1) and 0-4 tumours (2)."""
    X, Y, Z = patient_coords(geom)
    r = min(geom.shape[1] * geom.spacing[1], geom.shape[2] * geom.spacing[2]) / 2
    hz = geom.shape[0] * geom.spacing[0] / 2
    u = (X / r, Y / r, Z / hz)  # in-plane in units of the half field of view, z of the half height
    img = np.full(geom.shape, -1000.0, np.float32)
    ex, ey, inner = _body(img, u, rng)
    label = _liver_and_tumours(img, u, (X, Y, Z), r, inner, rng)
    ribs = _ribs(u, ex - 0.05, ey - 0.05, rng)
    np.copyto(img, 600, where=ribs)
    label[ribs] = 0
    _blur(img)
    _add_noise(img, rng.uniform(*NOISE_HU), rng)
    return img, label


def _body(img: np.ndarray, u, rng) -> tuple[float, float, np.ndarray]:
    """Fat, soft tissue, bowel gas, spine, vessels, kidneys and spleen into `img`; (ex, ey, inner mask)."""
    ex = rng.uniform(0.85, 0.97)
    ey = ex * rng.uniform(0.62, 0.78)
    body = (u[0] / ex) ** 2 + (u[1] / ey) ** 2
    np.copyto(img, rng.uniform(-120, -80), where=body < 1)  # subcutaneous fat
    inner = (u[0] / (ex - 0.08)) ** 2 + (u[1] / (ey - 0.08)) ** 2 < 1
    soft = smooth_field(u, rng)
    soft *= 8
    soft += 40
    np.copyto(img, soft, where=inner)  # muscle, bowel wall, other soft tissue
    del soft
    for _ in range(rng.integers(2, 5)):  # bowel gas
        c = (rng.uniform(0.0, 0.5), rng.uniform(-0.45, -0.1), rng.uniform(-0.8, 0.8))
        _paint(img, u, c, (0.06, 0.05, 0.1), -750, inner)
    organs = [((0.0, ey - 0.25, 0), (0.13, 0.11, 9), 700),  # vertebral body cortex
              ((0.0, ey - 0.25, 0), (0.11, 0.09, 9), 250),  # cancellous bone
              ((0.0, ey - 0.1, 0), (0.04, 0.035, 9), 20),  # spinal canal
              ((0.06, ey - 0.42, 0), (0.06, 0.06, 9), 170),  # aorta
              ((-0.1, ey - 0.45, 0), (0.07, 0.06, 9), 130),  # inferior vena cava
              ((-0.36, ey - 0.38, -0.45), (0.11, 0.14, 0.35), 165),  # kidneys, lower abdomen
              ((0.36, ey - 0.38, -0.45), (0.11, 0.14, 0.35), 165),
              ((0.5, 0.05, 0.35), (0.14, 0.22, 0.4), 105)]  # spleen
    for centre, axes, hu in organs:
        _paint(img, u, centre, axes, hu)
    return ex, ey, inner


def _paint(img: np.ndarray, u, centre, axes, value: float, where: np.ndarray | None = None) -> None:
    """Set `img` to `value` inside an ellipsoid (and `where`), working only in the ellipsoid's box."""
    terms = [((c - m) / a) ** 2 for c, m, a in zip(u, centre, axes)]
    box = [slice(0, n) for n in img.shape]
    for t in terms:  # inside needs every term < 1: intersect the boxes where each is
        for ax, (s, n) in enumerate(zip(bounding_box(t < 1), t.shape)):
            if n > 1:
                box[ax] = slice(max(box[ax].start, s.start), min(box[ax].stop, s.stop))
    box = tuple(box)
    if any(s.stop <= s.start for s in box):
        return
    inside = sum(t[_crop_one(t, box)] for t in terms) < 1
    if where is not None:
        inside = inside & where[_crop_one(where, box)]
    np.copyto(img[box], value, where=inside)


def _liver_and_tumours(img: np.ndarray, u, xyz, r: float, inner: np.ndarray, rng) -> np.ndarray:
    """Liver (1) and 0-4 tumours (2) into `img`; the label. Drawn inside the liver's box only."""
    label = np.zeros(img.shape, np.uint8)
    liver_box, liver = _liver_mask(u, rng, inner)
    label[liver_box] = liver
    liver_hu = rng.uniform(90, 130)
    ub, view = _crop(u, liver_box), img[liver_box]
    np.copyto(view, liver_hu + 6 * smooth_field(ub, rng), where=liver)
    lab_view = label[liver_box]
    for _ in range(rng.choice(5, p=[0.1, 0.3, 0.3, 0.2, 0.1])):
        near, tumour = _tumour_mask(xyz, liver_box, liver, r, rng)
        hu = liver_hu - rng.uniform(*TUMOUR_CONTRAST_HU) + 5 * smooth_field(_crop(ub, near), rng)
        np.copyto(view[near], hu, where=tumour)
        lab_view[near][tumour] = 2
    return label


def _liver_mask(u, rng, inner) -> tuple[tuple[slice, ...], np.ndarray]:
    """Liver: a wedge-shaped ellipsoid on the patient's right with a randomly deformed surface; (box, mask in box)."""
    c = (-0.38 + rng.uniform(-0.08, 0.08), -0.05 + rng.uniform(-0.08, 0.08), rng.uniform(-0.1, 0.25))
    a = [float(v) for v in np.array([0.42, 0.34, 0.75]) * rng.uniform(0.85, 1.15, size=3)]
    taper = 1 - 0.55 * np.clip((u[0] - c[0]) / a[0], 0, 1)  # thins towards the left lobe tip
    d = ((u[0] - c[0]) / a[0]) ** 2 + ((u[1] - c[1]) / (a[1] * taper)) ** 2 + ((u[2] - c[2]) / a[2]) ** 2
    inner = np.broadcast_to(inner, d.shape)
    box = bounding_box((d < 1.45) & inner)  # the field below is in [-1, 1]: no liver outside d < 1.4
    deformed = d[box] + 0.4 * smooth_field(_crop(u, box), rng) < 1
    return box, deformed & inner[box]


def _tumour_mask(xyz, box, liver: np.ndarray, r: float, rng) -> tuple[tuple[slice, ...], np.ndarray]:
    """One roughly spherical tumour (mm-isotropic) centred near a random liver voxel, inside the liver (in `box`);
    (its own box within `box`, mask in that box)."""
    idx = np.flatnonzero(liver)
    if idx.size == 0:
        return (slice(0, 0),) * 3, np.zeros((0, 0, 0), bool)
    full = [np.broadcast_to(c[_crop_one(c, box)], liver.shape) for c in xyz]
    centre = [c[np.unravel_index(rng.choice(idx), liver.shape)] for c in full]  # each axis its own voxel
    rho = rng.uniform(0.07, 0.20) * r
    xb = _crop(xyz, box)
    dist = np.sqrt(sum((c - m) ** 2 for c, m in zip(xb, centre)))
    near = bounding_box((dist < 1.2 * rho) & liver)  # the wobble below stays within 1 +- 0.15
    wobble = 1 + 0.15 * smooth_field(tuple(c / rho for c in _crop(xb, near)), rng, terms=3)
    return near, (dist[near] < rho * wobble) & liver[near]


def _crop_one(c: np.ndarray, box: tuple[slice, ...]) -> tuple[slice, ...]:
    """Index of a compact array for a (z, y, x) box."""
    return tuple(s if n > 1 else slice(None) for s, n in zip(box, c.shape))


def _ribs(u, ax: float, ay: float, rng) -> np.ndarray:
    """Rib cross-sections: small discs on the body wall, each present in bands of slices."""
    ribs = np.zeros(full_shape(u), bool)
    for t in np.linspace(0.15, np.pi - 0.15, 8):
        for side in (-1, 1):
            cx, cy = side * ax * np.sin(t), ay * np.cos(t)
            band = np.sin(u[2] * rng.uniform(6, 10) + rng.uniform(0, 2 * np.pi)) > 0.2
            disc = ((u[0] - cx) / 0.035) ** 2 + ((u[1] - cy) / 0.03) ** 2 < 1
            box = tuple(s if n > 1 else slice(None) for s, n in zip(bounding_box(disc), disc.shape))
            ribs[box] |= disc[_crop_one(disc, box)] & band[_crop_one(band, box)]
    return ribs


def _blur(img: np.ndarray, sigma: float = 0.6) -> None:
    """Partial-volume blur (Gaussian, voxels) in place, within the box of what is not air (air stays air)."""
    box = tuple(slice(max(0, b.start - 3), b.stop + 3) for b in bounding_box(img > -1000))
    view = img[box]
    ndimage.gaussian_filter(view, sigma=sigma, output=view)


def _add_noise(img: np.ndarray, sd_hu: float, rng, slab_voxels: int = 8_000_000) -> None:
    """Gaussian quantum noise of `sd_hu`, added slab by slab (the same stream as one draw, less memory)."""
    step = max(1, slab_voxels // max(1, img[0].size))
    for z in range(0, img.shape[0], step):
        img[z:z + step] += rng.normal(0, sd_hu, size=img[z:z + step].shape).astype(np.float32)
