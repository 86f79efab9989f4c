"""The synthetic liver: its shape, texture and vessels, the gallbladder and vena cava beside it, cysts and lesions.

Drawn by anatomy.draw_case into an image that already holds the rest of the patient, in the body frame (mm of the
nominal adult, anatomy.Frame). The label is liver (1) for the parenchyma with its intrahepatic vessels and cysts,
tumour (2) for the lesions; the gallbladder and the vena cava are carved out (0), as in Task03's reference masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import tissues as T
from .shapes import Frame, _crop_one, blob, fill, smooth_field, tube


@dataclass(frozen=True)
class LiverPlan:
    """Where the liver lies and how large it is (body mm); its dome is at body Z 0."""

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]

    @property
    def z_range(self) -> tuple[float, float]:
        """(bottom, top) of the liver in body Z."""
        return self.centre[2] - self.axes[2], self.centre[2] + self.axes[2]


def plan_liver(rng: np.random.Generator, span_mm: tuple[float, float]) -> LiverPlan:
    """A liver of this patient: cranio-caudal span drawn from `span_mm`, in-plane size +-12 %, position +-8 mm."""
    az = rng.uniform(*span_mm) / 2
    axes = (95 * rng.uniform(0.88, 1.12), 80 * rng.uniform(0.88, 1.12), az)
    return LiverPlan((-65 + rng.uniform(-8, 8), -5 + rng.uniform(-8, 8), -az), axes)


def _liver_shape(s: Frame, plan: LiverPlan, field: np.ndarray) -> np.ndarray:
    """Inside the liver: a wedge-shaped ellipsoid thinning towards the left lobe, its surface deformed by `field`."""
    c, a = plan.centre, plan.axes
    taper = 1 - 0.55 * np.clip((s.x - c[0]) / a[0], 0, 1)
    d = ((s.x - c[0]) / a[0]) ** 2 + ((s.y - c[1]) / (a[1] * taper)) ** 2 + ((s.z - c[2]) / a[2]) ** 2
    return d + 0.4 * field < 1


def draw_liver(img: np.ndarray, label: np.ndarray, f: Frame, cavity: np.ndarray, plan: LiverPlan, hu: dict,
               phase: int, scale: float, rng: np.random.Generator) -> list[dict]:
    """The liver with vessels, gallbladder, vena cava, cysts and lesions into `img` and `label`; the lesions drawn
    (kind, diameter in image mm, voxels)."""
    c, a = plan.centre, plan.axes
    lo, hi = tuple(m - 1.2 * v for m, v in zip(c, a)), tuple(m + 1.2 * v for m, v in zip(c, a))
    box = f.box(lo, hi)
    if any(s.stop <= s.start for s in box):
        return []
    sub = f.crop(box)
    norm = (sub.x / a[0], sub.y / a[1], sub.z / a[2])
    liver = np.broadcast_to(_liver_shape(sub, plan, smooth_field(norm, rng)), sub.shape)
    liver = liver & cavity[_crop_one(cavity, box)]
    texture = np.float32(hu["liver"]) + 6 * smooth_field(norm, rng)
    np.copyto(img[box], texture, where=liver)
    label[box][liver] = 1
    inside = np.zeros(img.shape, bool)
    inside[box] = liver
    _vessels(img, f, plan, hu, inside, rng)
    carve = [tube(img, f, (-24, 32, 30), (-24, 32, -265), 11, hu["ivc"]),  # the vena cava behind the liver
             blob(img, f, (c[0] + 0.2 * a[0], c[1] - 0.55 * a[1], c[2] - 0.45 * a[2]), (17, 19, 36), hu["bile"])]
    for hit in carve:
        if hit:
            label[hit[0]][hit[1]] = 0
            inside[hit[0]][hit[1]] = False
    if rng.random() < T.CYST_SHARE:
        for _ in range(rng.integers(1, 3)):
            _round_lesion(img, label, f, inside, rng.uniform(*T.CYST_DIAMETER_MM) / 2, lambda r, s: hu["cyst"], 1, rng)
    lesions = []
    for i in range(T.lesion_count(rng)):
        kind = T.lesion_kind(rng)
        lesions.append(_lesion(img, label, f, inside, kind, hu, phase, i == 0, rng))
        lesions[-1]["diameter_mm"] = round(lesions[-1]["diameter_mm"] * scale, 2)
    return [les for les in lesions if les["voxels"]]


def _vessels(img, f: Frame, plan: LiverPlan, hu: dict, inside: np.ndarray, rng) -> None:
    """Portal vein (trunk outside, branches inside) and three hepatic veins into the vena cava, inside the liver."""
    c, a = plan.centre, plan.axes
    at = lambda u, v, w: (c[0] + u * a[0], c[1] + v * a[1], c[2] + w * a[2])  # noqa: E731
    hilum = at(0.3, 0.25, -0.2)
    tube(img, f, hilum, (hilum[0] + 30, hilum[1] + 10, hilum[2] - 45), 8, hu["portal_vein"])  # trunk
    ends = [at(-0.6, 0.1, 0.05), at(0.75, -0.3, 0.2)]
    for end, r in zip(ends, (6.0, 5.0)):
        tube(img, f, hilum, end, r, hu["portal_vein"], inside)
        for _ in range(2):  # segmental branches
            t = rng.uniform(0.3, 0.8)
            start = tuple(h + t * (e - h) for h, e in zip(hilum, end))
            tip = tuple(s + d for s, d in zip(start, rng.normal(0, 35, 3)))
            tube(img, f, start, tip, 3.0, hu["portal_vein"], inside)
    confluence = (-24.0, 32.0, c[2] + 0.8 * a[2])
    for u, v in ((-0.7, -0.2), (-0.1, -0.6), (0.5, -0.5)):
        tube(img, f, confluence, at(u, v, 0.25 + rng.uniform(-0.1, 0.1)), 4.5, hu["hepatic_vein"], inside)


def _round_lesion(img, label, f: Frame, inside: np.ndarray, radius: float, value, lab: int, rng) -> int:
    """A roughly spherical lesion of `radius` body mm (wobbled +-15 %) around a random liver voxel, inside the liver:
    `value(relative radius, frame of its box)` HU, label `lab`; its voxels."""
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return 0
    at = np.unravel_index(rng.choice(idx), inside.shape)
    centre = [float(c[tuple(i if n > 1 else 0 for i, n in zip(at, c.shape))]) for c in (f.x, f.y, f.z)]
    seed = int(rng.integers(2 ** 32))  # the wobble's own stream
    cached: dict = {}

    def rel(s: Frame) -> np.ndarray:
        """Distance to the centre over the wobbled radius: computed once for the box `fill` hands to both calls."""
        if cached.get("frame") is not s:
            dist = np.sqrt(sum((v - m) ** 2 for v, m in zip((s.x, s.y, s.z), centre)))
            wobble = 1 + 0.15 * smooth_field(tuple(v / radius for v in (s.x, s.y, s.z)), np.random.default_rng(seed), 3)
            cached.update(frame=s, rel=dist / (radius * wobble))
        return cached["rel"]
    lo, hi = tuple(m - 1.2 * radius for m in centre), tuple(m + 1.2 * radius for m in centre)
    hit = fill(img, f, lo, hi, lambda s: rel(s) < 1, lambda s: value(rel(s), s), inside)
    if not hit:
        return 0
    label[hit[0]][hit[1]] = lab
    return int(hit[1].sum())


def _lesion(img, label, f: Frame, inside: np.ndarray, kind: str, hu: dict, phase: int, index: bool, rng) -> dict:
    """One tumour of `kind`: its phase's contrast to the liver, an enhancing rim or a necrotic centre where the kind
    has them; label 2."""
    _, _, rim_ok, necrosis_ok = T.LESIONS[kind]
    diameter = T.lesion_diameter(rng, index)
    contrast = T.lesion_contrast(kind, phase, rng)
    base = hu["liver"] + contrast
    rim = rng.uniform(*T.RIM_HU) if rim_ok and phase > 0 and rng.random() < 0.5 else 0.0
    necrotic = necrosis_ok and diameter > 30 and rng.random() < 0.5
    seed = int(rng.integers(2 ** 32))

    def value(r: np.ndarray, s: Frame) -> np.ndarray:
        v = np.float32(base) + 5 * smooth_field((s.x / 20, s.y / 20, s.z / 20), np.random.default_rng(seed), 3)
        if rim:
            v = np.where(r > 0.8, v + np.float32(rim), v)
        if necrotic:
            v = np.where(r < 0.45, np.float32(T.NECROSIS_HU), v)
        return v
    voxels = _round_lesion(img, label, f, inside, diameter / 2, value, 2, rng)
    return {"kind": kind, "diameter_mm": diameter, "contrast_hu": round(contrast, 1), "rim": bool(rim),
            "necrotic": bool(necrotic), "voxels": voxels}
