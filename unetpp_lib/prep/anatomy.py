"""Synthetic CT anatomy in Hounsfield units: a patient from the lower chest to the pelvis, the liver and its lesions.

`draw_case(geom, rng)` draws one scan's image, label and description for a geometry (prep/synthetic.py writes them
in the MSD layout). Anatomy lives in a body frame in millimetres of a nominal adult (X left, Y posterior, Z superior,
0 at the liver dome), scaled to the scan's field of view (a field of view of 360-400 mm shows a life-size patient;
the tests' 30 mm fields a miniature one with the same anatomy). The scan covers a window of that body along Z: from
a slab of the liver (short fields) to lower chest, abdomen and pelvis (Task03's lengths). Tissues take their phase's
HU (tissues.py); the liver and its vessels, cysts and lesions are drawn by prep/liver.py. Coordinates stay compact
arrays that broadcast to the volume and every organ is drawn inside its own box, so a case of Task03's median size
(482 x 512 x 512) takes ~11 s.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy import ndimage

from ..core.io import Geometry
from . import tissues as T
from .liver import draw_liver, plan_liver
from .shapes import Frame, blob, body_frame, bounding_box, fill, smooth_field, tube
from .shapes import patient_coords  # noqa: F401 (re-exported: the tests and older callers find it here)

NOMINAL_HALF_WIDTH_MM = 175.0  # the nominal body's outer half-width at the hips (muscle wall 158 mm + fat)
LIVER_SPAN_MM = (150.0, 190.0)  # cranio-caudal liver extent of the nominal adult
SCAN_ABOVE_DOME_MM = (15.0, 280.0)  # how far above the liver dome a scan longer than the liver starts


@dataclass(frozen=True)
class Body:
    """One patient's build: in-plane size factors, subcutaneous fat and visceral fat share."""

    width: float
    depth: float
    fat_mm: float
    visceral_fat: float

    def half_axes(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Half-width and half-depth (mm) of the muscle wall's outer surface along body Z."""
        knots = (-480, -380, -280, -150, 0, 150, 300)
        ax = np.interp(z, knots, (150, 158, 150, 142, 148, 145, 132)).astype(np.float32) * np.float32(self.width)
        ay = np.interp(z, knots, (100, 105, 102, 105, 108, 105, 95)).astype(np.float32) * np.float32(self.depth)
        return ax, ay


def draw_body(img: np.ndarray, f: Frame, body: Body, hu: dict, rng) -> np.ndarray:
    """Skin and subcutaneous fat, the muscle wall and the cavity's fill (mediastinal fat above the diaphragm,
    bowel loops in mesenteric fat below it) into `img`; the cavity mask (inside the muscle wall)."""
    ax, ay = body.half_axes(f.z)
    r2 = (f.x / ax) ** 2 + (f.y / ay) ** 2  # full volume
    grow = 1 + body.fat_mm / ax, 1 + body.fat_mm / ay  # the fat layer, relative
    outer = (f.x / (ax * grow[0])) ** 2 + (f.y / (ay * grow[1])) ** 2 < 1
    np.copyto(img, np.float32(hu["fat"]), where=outer)
    del outer
    wall = 1 - 14 / ax  # 14 mm of muscle wall
    cavity = r2 < wall ** 2
    np.copyto(img, np.float32(hu["muscle"]), where=(r2 < 1) & ~cavity)
    del r2
    # bowel loops (enhancing wall ~5 mm, fluid lumen) in mesenteric fat; mediastinal fat above the diaphragm
    loops = smooth_field((f.x / 45, f.y / 40, f.z / 45), rng, terms=6)  # ~N(0, 0.29): fat below its quantile
    fat_level = np.float32(0.29 * NormalDist().inv_cdf(body.visceral_fat))
    fill_hu = np.where((loops > fat_level) & (f.z < 25), np.float32(hu["bowel_wall"]), np.float32(hu["fat"]))
    np.copyto(fill_hu, np.float32(hu["bowel_content"]), where=(loops > fat_level + np.float32(0.1)) & (f.z < 25))
    np.copyto(img, fill_hu, where=cavity)
    del fill_hu, loops
    return cavity


def diaphragm(f: Frame) -> np.ndarray:
    """Body Z of the diaphragm's dome above each (x, y): highest over the right lobe, lowest behind (the recesses)."""
    side = np.where(f.x > 0, np.float32(12), np.float32(0))
    return 15 - 0.0035 * (np.abs(f.x) - 60) ** 2 - 0.002 * (f.y + 20) ** 2 - side


def draw_chest(img, f: Frame, cavity: np.ndarray, hu: dict, rng) -> None:
    """Lungs above the diaphragm (beside the mediastinum) and the heart on it."""
    def lung(s: Frame):
        mediastinum = (np.abs(s.x) < 45) & (s.y < 55)
        return (s.z > diaphragm(s)) & ~mediastinum
    fill(img, f, (-250, -200, -70), (250, 200, 400), lung,
         lambda s: np.float32(hu["lung"]) + 25 * smooth_field((s.x / 80, s.y / 80, s.z / 80), rng, 3), cavity)
    c, a = (22 + rng.uniform(-8, 8), -25 + rng.uniform(-8, 8), 72), (72, 55, 58)
    blob(img, f, c, tuple(v + 5 for v in a), hu["fat"])  # pericardial fat
    blob(img, f, c, a, hu["myocardium"])
    blob(img, f, (c[0] + 4, c[1], c[2] + 4), tuple(v * 0.68 for v in a), hu["heart_blood"])


def draw_skeleton(img, f: Frame, body: Body, hu: dict, rng) -> None:
    """Spine (vertebrae, discs, canal, posterior arches), paraspinal and psoas muscles, ribs, sternum and pelvis."""
    top, bottom = 420, -560
    for side in (-1, 1):
        tube(img, f, (side * 38, 112, top), (side * 38, 112, bottom), 24, hu["muscle"])  # paraspinal muscles
        tube(img, f, (side * 35, 62, -120), (side * 62, 42, -320), 19, hu["muscle"])  # psoas
    tube(img, f, (0, 68, top), (0, 68, bottom), 21, hu["cortical_bone"])  # vertebral bodies
    phase = rng.uniform(0, 32)
    tube(img, f, (0, 68, top), (0, 68, bottom), 18,
         lambda s: np.where((s.z + phase) % 32 < 7, np.float32(hu["disc"]), np.float32(hu["cancellous_bone"])))
    tube(img, f, (0, 106, top), (0, 106, bottom), 13, hu["cortical_bone"])  # arch around the canal
    tube(img, f, (0, 104, top), (0, 104, bottom), 8, hu["csf"])
    tube(img, f, (0, 126, top), (0, 126, bottom), 6, hu["cortical_bone"])  # spinous processes
    for t in np.linspace(0.25, np.pi - 0.25, 7):  # ribs: bands of discs on the muscle wall
        for side in (-1, 1):
            pitch, shift = rng.uniform(26, 32), rng.uniform(0, 32)
            cx, cy = side * 146 * body.width * np.sin(t), -104 * body.depth * np.cos(t)

            def rib(s, cx=cx, cy=cy, pitch=pitch, shift=shift):
                return ((s.x - cx) ** 2 + (s.y - cy) ** 2 < 64) & ((s.z + shift) % pitch < 11)
            fill(img, f, (cx - 9, cy - 9, -150 + 60 * np.cos(t) ** 2), (cx + 9, cy + 9, 260), rib,
                 hu["cortical_bone"])
    tube(img, f, (0, -96 * body.depth, -10), (0, -100 * body.depth, 200), 9, hu["cortical_bone"])  # sternum
    for side in (-1, 1):  # pelvis: iliac wings, femoral heads and shafts
        fill(img, f, (side * 50 - 70, -40, -340), (side * 50 + 70, 120, -240),
             lambda s, side=side: (np.abs(np.hypot((s.x - side * 92) / 52, (s.y - 45) / 68) - 1) < 0.11)
             & (side * s.x > 60), hu["cortical_bone"])
        blob(img, f, (side * 90, 8, -430), (25, 25, 25), hu["cortical_bone"])
        blob(img, f, (side * 90, 8, -430), (20, 20, 20), hu["cancellous_bone"])
        tube(img, f, (side * 96, 10, -450), (side * 108, 12, -600), 14, hu["cortical_bone"])
    blob(img, f, (0, 88, -320), (45, 22, 60), hu["cancellous_bone"])  # sacrum


def draw_abdomen(img, f: Frame, cavity: np.ndarray, hu: dict, rng) -> None:
    """Great vessels, spleen, stomach, kidneys, pancreas, colon with gas, bladder (before the liver is drawn)."""
    j = lambda s=8.0: rng.uniform(-s, s)  # noqa: E731 (per-organ position jitter, mm)
    tube(img, f, (18, 40, 420), (18, 40, -265), 12, hu["aorta"])
    for side in (-1, 1):
        tube(img, f, (18, 40, -265), (18 + side * 70, 30, -420), 7, hu["aorta"])  # iliac arteries
    tube(img, f, (-24, 32, 30), (-24, 32, -265), 11, hu["ivc"])
    blob(img, f, (105 + j(), 48 + j(), -62 + j(15)), (34, 48, 55 * rng.uniform(0.8, 1.2)), hu["spleen"], cavity)
    st = (72 + j(), -28 + j(), -58 + j(15))
    blob(img, f, st, (46, 40, 55), hu["bowel_wall"], cavity)
    blob(img, f, st, (40, 34, 49), lambda s: np.where(s.y < st[1] - 12, np.float32(hu["gas"]),
                                                       np.float32(hu["stomach_fluid"])), cavity)
    for side, dz in ((-1, -12), (1, 0)):  # the right kidney sits lower
        c = (side * 74 + j(4), 58 + j(4), -140 + dz + j(12))
        blob(img, f, c, (30, 30, 54), hu["kidney_cortex"], cavity)
        blob(img, f, c, (19, 19, 40), hu["kidney_medulla"], cavity)
    tube(img, f, (-20, 18, -112 + j()), (82, 30, -95 + j()), 12, hu["pancreas"], cavity)
    colon = [(-105, 12, -270), (-108, 8, -150), (-60, -55, -145), (60, -55, -135), (108, 20, -125),
             (106, 22, -280), (30, 20, -330)]
    gas = lambda s: np.where(smooth_field((s.x / 25, s.y / 25, s.z / 25), rng, 3) > 0.2,  # noqa: E731
                             np.float32(hu["gas"]), np.float32(hu["bowel_content"]))
    for p0, p1 in zip(colon, colon[1:]):
        tube(img, f, p0, p1, 24, hu["bowel_wall"], cavity)
        tube(img, f, p0, p1, 20, gas, cavity)
    for _ in range(rng.integers(3, 8)):  # small-bowel gas
        blob(img, f, (rng.uniform(-90, 90), rng.uniform(-80, 0), rng.uniform(-320, -150)), (14, 11, 18),
             hu["gas"], cavity)
    blob(img, f, (0, -25, -400 + j()), (52, 40, 42), hu["urine"], cavity)  # bladder


def scan_window(length: float, liver: tuple[float, float], rng) -> float:
    """Body Z of the scan's centre: a scan longer than the liver (and 40 mm) holds all of it, starting 15-280 mm
    above the dome (liver-only to chest-abdomen-pelvis); a shorter one is a slab through the liver."""
    bottom, top = liver
    spare = length - (top - bottom)
    if spare < 40:
        return (bottom + top) / 2 + rng.uniform(-0.3, 0.3) * max(0.0, top - bottom - length)
    above = rng.uniform(SCAN_ABOVE_DOME_MM[0], min(SCAN_ABOVE_DOME_MM[1], spare - 20))
    return top + above - length / 2


def draw_case(geom: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image HU float32, label uint8, description) of one scan: the patient in the scan's window and phase, the
    liver (1) and its lesions (2), blurred and noisy as acquired."""
    half_fov = min(geom.shape[1] * geom.spacing[1], geom.shape[2] * geom.spacing[2]) / 2
    body = Body(rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1), rng.uniform(8, 35), rng.uniform(0.25, 0.6))
    scale = half_fov * rng.uniform(0.86, 0.97) / (NOMINAL_HALF_WIDTH_MM * body.width)  # image mm per body mm
    plan = plan_liver(rng, LIVER_SPAN_MM)
    length = geom.shape[0] * geom.spacing[0] / scale
    f = body_frame(geom, scale, scan_window(length, plan.z_range, rng))
    phase = T.draw_phase(rng)
    hu = T.case_hu(phase, rng)
    img = np.full(geom.shape, hu["air"], np.float32)
    cavity = draw_body(img, f, body, hu, rng)
    draw_chest(img, f, cavity, hu, rng)
    draw_abdomen(img, f, cavity, hu, rng)
    draw_skeleton(img, f, body, hu, rng)
    label = np.zeros(geom.shape, np.uint8)
    lesions = draw_liver(img, label, f, cavity, plan, hu, phase, scale, rng)
    dose_noise = rng.uniform(*T.NOISE_HU)
    noise = T.voxel_noise(dose_noise, geom.spacing)
    blur = rng.uniform(*T.RECON_BLUR_MM)
    acquire(img, geom.spacing, blur, noise, rng)
    info = {"phase": T.PHASES[phase], "scale": round(float(scale), 4), "noise_hu": round(float(noise), 2),
            "noise_hu_at_5mm": round(float(dose_noise), 2),
            "body_z_mm": [round(float(f.z.min()), 1), round(float(f.z.max()), 1)],
            "liver_z_mm": [round(v, 1) for v in plan.z_range], "lesions": lesions}
    return img, label, info


def draw_anatomy(geom: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of draw_case."""
    img, label, _ = draw_case(geom, rng)
    return img, label


def acquire(img: np.ndarray, spacing, blur_mm: float, noise_hu: float, rng) -> None:
    """In place: reconstruction blur in-plane (`blur_mm`), the slice profile along z (partial volume), then white
    quantum noise of `noise_hu` everywhere; the blur only inside the box of what is not air."""
    box = tuple(slice(max(0, b.start - 3), b.stop + 3) for b in bounding_box(img > -1000))
    view = img[box]
    sigma = (T.SLICE_PROFILE, max(0.35, blur_mm / spacing[1]), max(0.35, blur_mm / spacing[2]))
    ndimage.gaussian_filter(view, sigma=sigma, output=view)
    step = max(1, 8_000_000 // max(1, img[0].size))  # slab by slab: the same stream as one draw, less memory
    for z in range(0, img.shape[0], step):
        img[z:z + step] += rng.normal(0, noise_hu, size=img[z:z + step].shape).astype(np.float32)
