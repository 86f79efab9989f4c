"""Synthetic abdominal CT with liver and tumour labels, written in the exact MSD Task03 layout.

So every stage runs anywhere without the 27 GB tarball: Hounsfield-unit volumes with
air, fat, muscle, bone, vessels, kidneys, spleen, a liver of varied shape and position
and 0-4 hypodense tumours inside it; per-case spacing and non-identity directions
(flipped and oblique, as LiTS volumes are stored). With `quirks` it also reproduces what
the real tarball holds: macOS `._` shadow files, gaps in the case ids, int16/float32/
float64 images and float-typed labels. Deterministic for a seed.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .io import Geometry, atomic_path, renew_stamp, write_image, write_json
from .layout import TaskLayout, dataset_entries
from .parallel import map_cases

REF_SPACING = (1.0, 0.768, 0.768)  # Task03 median spacing (z, y, x) mm
LABELS = {"0": "background", "1": "liver", "2": "cancer"}
DIRECTIONS = ("flip_xy", "flip_z", "oblique", "identity")  # cycled over cases
TUMOUR_CONTRAST_HU = (10.0, 40.0)  # hypodense lesions: this much below the liver, as in portal-venous CT
NOISE_HU = (10.0, 20.0)  # per-case standard deviation of the quantum noise
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # header of a `._` file


@dataclass(frozen=True)
class CaseSpec:
    """Everything needed to draw one synthetic case."""

    case_id: str
    index: int
    seed: int
    fov_mm: tuple[float, float, float]  # (z, y, x)
    inplane_range: tuple[float, float]
    z_range: tuple[float, float]
    image_dtype: str
    label_dtype: str
    with_label: bool


def case_ids(num_training: int, num_test: int, quirks: bool) -> tuple[list[int], list[int]]:
    """Training and test ids; with quirks every 5th id is missing, as gaps in a real release."""
    ids, n = [], 0
    while len(ids) < num_training + num_test:
        if not (quirks and n % 5 == 4):
            ids.append(n)
        n += 1
    return ids[:num_training], ids[num_training:]


def direction_matrix(kind: str, rng: np.random.Generator) -> np.ndarray:
    """3x3 ITK direction: axis flips as LiTS files often have, or a gantry tilt about x."""
    if kind == "flip_xy":
        return np.diag([-1.0, -1.0, 1.0])
    if kind == "flip_z":
        return np.diag([1.0, 1.0, -1.0])
    if kind == "oblique":
        a = math.radians(rng.uniform(3, 12))
        tilt = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        return np.diag([-1.0, -1.0, 1.0]) @ tilt
    return np.eye(3)


def case_geometry(spec: CaseSpec, rng: np.random.Generator) -> Geometry:
    """Spacing (in-plane uniform, slices log-uniform), shape covering the field of view, direction, origin."""
    inplane = rng.uniform(*spec.inplane_range)
    lo, hi = np.log(spec.z_range[0]), np.log(spec.z_range[1])
    sz = float(np.exp(rng.uniform(lo, hi)))
    spacing = (round(sz, 4), round(inplane, 4), round(inplane, 4))
    fov = np.array(spec.fov_mm) * rng.uniform(0.95, 1.1)
    shape = tuple(max(4, int(round(f / s))) for f, s in zip(fov, spacing))
    direction = direction_matrix(DIRECTIONS[spec.index % len(DIRECTIONS)], rng)
    origin = (rng.uniform(-220, -150), rng.uniform(-250, -150), rng.uniform(-700, -100))
    return Geometry(shape, spacing, tuple(float(o) for o in origin),
                    tuple(float(v) for v in direction.ravel()))


def patient_coords(geom: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-frame offsets (X left, Y posterior, Z superior; mm) of every voxel from the volume centre."""
    d = np.array(geom.direction).reshape(3, 3)
    # index offsets in mm along the array's x, y, z axes, broadcastable to (z, y, x)
    ax = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s
          for n, s in zip(geom.shape[::-1], geom.spacing[::-1])]
    ox, oy, oz = ax[0][None, None, :], ax[1][None, :, None], ax[2][:, None, None]
    return tuple(np.broadcast_to(d[r, 0] * ox + d[r, 1] * oy + d[r, 2] * oz, geom.shape)
                 .astype(np.float32) for r in range(3))


def smooth_field(u: tuple[np.ndarray, ...], rng: np.random.Generator, terms: int = 4) -> np.ndarray:
    """Smooth random field in [-1, 1] from a few low-frequency sinusoids of normalised coordinates."""
    f = np.zeros(u[0].shape, np.float32)
    for _ in range(terms):
        w = rng.normal(size=3) * rng.uniform(1.5, 4.0)
        f += np.sin(w[0] * u[0] + w[1] * u[1] + w[2] * u[2] + rng.uniform(0, 2 * np.pi))
    return f / terms


def ellipsoid(u: tuple[np.ndarray, ...], centre, axes) -> np.ndarray:
    """Normalised squared distance to an axis-aligned ellipsoid (< 1 inside)."""
    return sum(((c - m) / a) ** 2 for c, m, a in zip(u, centre, axes))


def draw_anatomy(geom: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image HU float32, label uint8) for one case: abdomen, liver (1) and 0-4 tumours (2)."""
    X, Y, Z = patient_coords(geom)
    r = min(geom.shape[1] * geom.spacing[1], geom.shape[2] * geom.spacing[2]) / 2
    hz = geom.shape[0] * geom.spacing[0] / 2
    u = (X / r, Y / r, Z / hz)  # in-plane in units of the half field of view, z of the half height
    img = np.full(geom.shape, -1000.0, np.float32)
    ex = rng.uniform(0.85, 0.97)
    ey = ex * rng.uniform(0.62, 0.78)
    body = (u[0] / ex) ** 2 + (u[1] / ey) ** 2
    img[body < 1] = rng.uniform(-120, -80)  # subcutaneous fat
    inner = (u[0] / (ex - 0.08)) ** 2 + (u[1] / (ey - 0.08)) ** 2 < 1
    img[inner] = (40 + 8 * smooth_field(u, rng))[inner]  # muscle, bowel wall, other soft tissue
    for _ in range(rng.integers(2, 5)):  # bowel gas
        c = (rng.uniform(0.0, 0.5), rng.uniform(-0.45, -0.1), rng.uniform(-0.8, 0.8))
        img[(ellipsoid(u, c, (0.06, 0.05, 0.1)) < 1) & inner] = -750
    img[ellipsoid(u, (0.0, ey - 0.25, 0), (0.13, 0.11, 9)) < 1] = 700  # vertebral body cortex
    img[ellipsoid(u, (0.0, ey - 0.25, 0), (0.11, 0.09, 9)) < 1] = 250  # cancellous bone
    img[ellipsoid(u, (0.0, ey - 0.1, 0), (0.04, 0.035, 9)) < 1] = 20  # spinal canal
    img[ellipsoid(u, (0.06, ey - 0.42, 0), (0.06, 0.06, 9)) < 1] = 170  # aorta
    img[ellipsoid(u, (-0.1, ey - 0.45, 0), (0.07, 0.06, 9)) < 1] = 130  # inferior vena cava
    for side in (-1, 1):  # kidneys, lower abdomen
        img[ellipsoid(u, (0.36 * side, ey - 0.38, -0.45), (0.11, 0.14, 0.35)) < 1] = 165
    img[ellipsoid(u, (0.5, 0.05, 0.35), (0.14, 0.22, 0.4)) < 1] = 105  # spleen
    liver = _liver_mask(u, rng, inner)
    liver_hu = rng.uniform(90, 130)
    img[liver] = liver_hu + 6 * smooth_field(u, rng)[liver]
    label = liver.astype(np.uint8)
    for _ in range(rng.choice(5, p=[0.1, 0.3, 0.3, 0.2, 0.1])):
        tumour = _tumour_mask((X, Y, Z), liver, r, rng)
        img[tumour] = liver_hu - rng.uniform(*TUMOUR_CONTRAST_HU) + 5 * smooth_field(u, rng)[tumour]
        label[tumour] = 2
    ribs = _ribs(u, ex - 0.05, ey - 0.05, rng)
    img[ribs] = 600
    label[ribs] = 0
    img = ndimage.gaussian_filter(img, sigma=0.6)  # partial-volume blur before noise
    img += rng.normal(0, rng.uniform(*NOISE_HU), size=img.shape).astype(np.float32)
    return img, label


def _liver_mask(u, rng, inner) -> np.ndarray:
    """Liver: a wedge-shaped ellipsoid on the patient's right with a randomly deformed surface."""
    c = (-0.38 + rng.uniform(-0.08, 0.08), -0.05 + rng.uniform(-0.08, 0.08), rng.uniform(-0.1, 0.25))
    a = np.array([0.42, 0.34, 0.75]) * rng.uniform(0.85, 1.15, size=3)
    taper = 1 - 0.55 * np.clip((u[0] - c[0]) / a[0], 0, 1)  # thins towards the left lobe tip
    d = ((u[0] - c[0]) / a[0]) ** 2 + ((u[1] - c[1]) / (a[1] * taper)) ** 2 + ((u[2] - c[2]) / a[2]) ** 2
    return (d + 0.4 * smooth_field(u, rng) < 1) & inner


def _tumour_mask(xyz, liver: np.ndarray, r: float, rng) -> np.ndarray:
    """One roughly spherical tumour (mm-isotropic) centred on a random liver voxel, kept inside the liver."""
    idx = np.flatnonzero(liver)
    if idx.size == 0:
        return np.zeros_like(liver)
    centre = [c.ravel()[rng.choice(idx)] for c in [xyz[0], xyz[1], xyz[2]]]
    rho = rng.uniform(0.07, 0.20) * r
    dist = np.sqrt(sum((c - m) ** 2 for c, m in zip(xyz, centre)))
    wobble = 1 + 0.15 * smooth_field(tuple(c / rho for c in xyz), rng, terms=3)
    return (dist < rho * wobble) & liver


def _ribs(u, ax: float, ay: float, rng) -> np.ndarray:
    """Rib cross-sections: small discs on the body wall, each present in bands of slices."""
    ribs = np.zeros(u[0].shape, bool)
    for t in np.linspace(0.15, np.pi - 0.15, 8):
        for side in (-1, 1):
            cx, cy = side * ax * np.sin(t), ay * np.cos(t)
            band = np.sin(u[2] * rng.uniform(6, 10) + rng.uniform(0, 2 * np.pi)) > 0.2
            ribs |= (((u[0] - cx) / 0.035) ** 2 + ((u[1] - cy) / 0.03) ** 2 < 1) & band
    return ribs


def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Round integer types (clipped to their range), keep float types as they are."""
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(arr), info.min, info.max).astype(dtype)
    return arr.astype(dtype)


def write_case(spec_and_dir: tuple[CaseSpec, str]) -> str:
    """Draw one case and write its image (and label) NIfTI files; skip files already there."""
    spec, out = spec_and_dir
    task = TaskLayout(out)
    img_path, lab_path = task.image(spec.case_id, test=not spec.with_label), task.label(spec.case_id)
    if img_path.exists() and (lab_path.exists() or not spec.with_label):
        return spec.case_id
    rng = np.random.default_rng([spec.seed, spec.index])
    geom = case_geometry(spec, rng)
    img, label = draw_anatomy(geom, rng)
    if spec.with_label:
        write_image(lab_path, _cast(label, spec.label_dtype), geom)
    write_image(img_path, _cast(img, spec.image_dtype), geom)
    return spec.case_id


def write_shadow(path: Path) -> None:
    """Write a macOS AppleDouble `._name` file beside `path`, as in the real tarball."""
    with atomic_path(path.with_name("._" + path.name)) as tmp:
        tmp.write_bytes(APPLE_DOUBLE.ljust(4096, b"\x00"))


def make_msd_task(out_dir: str | Path, num_training: int = 8, num_test: int = 2,
                  shape: tuple[int, int, int] | list[int] = (48, 96, 96), seed: int = 0,
                  quirks: bool = True, inplane_range: tuple[float, float] = (0.6, 0.9),
                  z_range: tuple[float, float] = (0.7, 5.0), num_workers: int = 1) -> Path:
    """Write a synthetic MSD Task03-style folder; `shape` is the field of view (z, y, x) in voxels at Task03's median spacing."""
    out = Path(out_dir)
    settings = {"num_training": num_training, "num_test": num_test, "shape": list(shape), "seed": seed,
                "quirks": quirks, "inplane_range": list(inplane_range), "z_range": list(z_range)}
    renew_stamp(out / "synthetic.json", settings, lambda: shutil.rmtree(out))  # made with other settings: afresh
    fov = tuple(float(n * s) for n, s in zip(shape, REF_SPACING))
    train_ids, test_ids = case_ids(num_training, num_test, quirks)
    img_types = ("int16", "float32", "int16", "float64") if quirks else ("int16",)
    lab_types = ("uint8", "float32", "uint8", "float64", "uint8") if quirks else ("uint8",)
    specs = [CaseSpec(f"liver_{n}", n, seed, fov, tuple(inplane_range), tuple(z_range),
                      img_types[i % len(img_types)], lab_types[i % len(lab_types)], i < num_training)
             for i, n in enumerate(train_ids + test_ids)]
    map_cases(write_case, [(s, str(out)) for s in specs], num_workers, desc="synthetic cases")
    if quirks:
        task = TaskLayout(out)
        for s in specs:
            for f in [task.image(s.case_id, test=not s.with_label)] + ([task.label(s.case_id)] if s.with_label else []):
                write_shadow(f)
    write_json(TaskLayout(out).dataset_json, msd_dataset_json(train_ids, test_ids))
    return out


def msd_dataset_json(train_ids: list[int], test_ids: list[int]) -> dict:
    """dataset.json with the keys of the MSD Task03 release."""
    return {
        "name": "Liver",
        "description": "Synthetic liver and tumour CT in the MSD Task03_Liver layout (unetpp_lib.synthetic)",
        "reference": "synthetic, generated by unetpp_lib",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": len(train_ids),
        "numTest": len(test_ids),
        **dataset_entries([f"liver_{n}" for n in train_ids], [f"liver_{n}" for n in test_ids]),
    }
