"""Synthetic CT with liver and tumour labels, written in the exact MSD Task03 layout.

So every stage runs anywhere without the 27 GB tarball: Hounsfield-unit scans of a patient
from the lower chest to the pelvis (lungs, heart, spleen, kidneys, stomach, pancreas, bowel,
bladder, great vessels, spine, ribs and pelvis; prep/anatomy.py) in a non-contrast, arterial
or portal-venous phase, the liver with its vessels, cysts and 0-15 lesions of three kinds and
LiTS-like sizes (prep/liver.py, prep/tissues.py); scan lengths and slice spacings drawn per
case, non-identity directions (flipped and oblique, as LiTS volumes are stored). With `quirks`
it also reproduces what the real tarball holds: macOS `._` shadow files, gaps in the case ids,
int16/float32/float64 images and float-typed labels. Deterministic for a seed. What each case
holds (phase, body range, lesions) is in the task's `synthetic_cases.json`.

A case of Task03's median size (482 x 512 x 512) takes ~11 s and ~2.5 GB (a demo case 0.3 s).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.currency import renew
from ..core.labels import MSD_LABELS
from ..core.io import Geometry, atomic_path, read_json, write_image, write_json
from ..core.layout import TaskLayout, dataset_entries
from ..core.pool import map_cases
from .anatomy import draw_case

REF_SPACING = (1.0, 0.768, 0.768)  # Task03 median spacing (z, y, x) mm
LENGTH_FACTOR = (0.55, 1.4)  # a scan's length over the field of view's z, log-uniform: liver-only to chest-pelvis
HOLDOUT_SEED = 1_000_003  # added to the run's seed for the longer held-out scans
DIRECTIONS = ("flip_xy", "flip_z", "oblique", "identity")  # cycled over cases
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
    fixed: tuple | None = None  # ((z, y, x) voxels, (z, y, x) mm): exactly this shape and spacing


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
    """Spacing (in-plane uniform, slices log-uniform), shape covering the field of view (its z times a length factor
    drawn log-uniform from LENGTH_FACTOR), direction, origin."""
    inplane = rng.uniform(*spec.inplane_range)
    lo, hi = np.log(spec.z_range[0]), np.log(spec.z_range[1])
    sz = float(np.exp(rng.uniform(lo, hi)))
    spacing = (round(sz, 4), round(inplane, 4), round(inplane, 4))
    fov = np.array(spec.fov_mm) * rng.uniform(0.95, 1.1)
    fov[0] *= float(np.exp(rng.uniform(*np.log(LENGTH_FACTOR))))
    shape = tuple(max(4, int(round(f / s))) for f, s in zip(fov, spacing))
    direction = direction_matrix(DIRECTIONS[spec.index % len(DIRECTIONS)], rng)
    origin = (rng.uniform(-220, -150), rng.uniform(-250, -150), rng.uniform(-700, -100))
    return Geometry(shape, spacing, tuple(float(o) for o in origin),
                    tuple(float(v) for v in direction.ravel()))


def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Round integer types (clipped to their range), keep float types as they are; a float array cast to an
    integer type is rounded in place (a real-size volume is 0.5 GB)."""
    if not np.issubdtype(np.dtype(dtype), np.integer):
        return arr.astype(dtype)
    info = np.iinfo(dtype)
    if arr.dtype.kind != "f":
        return np.clip(arr, info.min, info.max).astype(dtype)
    np.rint(arr, out=arr)
    np.clip(arr, info.min, info.max, out=arr)
    return arr.astype(dtype)


def description_path(out: str | Path, case_id: str) -> Path:
    """Where write_case keeps what it drew for a case (gathered into synthetic_cases.json)."""
    return Path(out) / ".synthetic" / f"{case_id}.json"


def write_case(spec_and_dir: tuple[CaseSpec, str]) -> str:
    """Draw one case and write its image (and label) NIfTI files and its description; skip a case already there."""
    spec, out = spec_and_dir
    task = TaskLayout(out)
    img_path, lab_path = task.image(spec.case_id, test=not spec.with_label), task.label(spec.case_id)
    described = description_path(out, spec.case_id)
    if img_path.exists() and (lab_path.exists() or not spec.with_label) and described.exists():
        return spec.case_id
    rng = np.random.default_rng([spec.seed, spec.index])
    geom = case_geometry(spec, rng)  # drawn also when fixed, so the rest of the stream is the same
    if spec.fixed:
        geom = Geometry(tuple(int(n) for n in spec.fixed[0]), tuple(float(v) for v in spec.fixed[1]),
                        geom.origin, geom.direction)
    img, label, info = draw_case(geom, rng)
    if spec.with_label:
        write_image(lab_path, _cast(label, spec.label_dtype), geom)
    write_image(img_path, _cast(img, spec.image_dtype), geom)
    described.parent.mkdir(exist_ok=True)
    write_json(described, {"case": spec.case_id, "shape": list(geom.shape), "spacing": list(geom.spacing),
                           "length_mm": round(geom.shape[0] * geom.spacing[0], 1), **info})
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
    renew(out / "synthetic.json", settings, lambda: shutil.rmtree(out))  # made with other settings: afresh
    fov = tuple(float(n * s) for n, s in zip(shape, REF_SPACING))
    train_ids, test_ids = case_ids(num_training, num_test, quirks)
    img_types = ("int16", "float32", "int16", "float64") if quirks else ("int16",)
    lab_types = ("uint8", "float32", "uint8", "float64", "uint8") if quirks else ("uint8",)
    specs = [CaseSpec(f"liver_{n}", n, seed, fov, tuple(inplane_range), tuple(z_range),
                      img_types[i % len(img_types)], lab_types[i % len(lab_types)], i < num_training)
             for i, n in enumerate(train_ids + test_ids)]
    _write_task(out, specs, num_workers, quirks)
    write_json(TaskLayout(out).dataset_json, msd_dataset_json(train_ids, test_ids))
    return out


def make_holdout(out_dir: str | Path, num_cases: int, length_factor: float, shape, seed: int,
                 inplane_range: tuple[float, float], z_range: tuple[float, float], num_workers: int = 1) -> Path:
    """Held-out labelled scans for a synthetic run: another seed, scans `length_factor` times as long, no quirks."""
    longer = (max(4, int(round(shape[0] * length_factor))), *shape[1:])
    return make_msd_task(out_dir, num_training=num_cases, num_test=0, shape=longer, seed=seed + HOLDOUT_SEED,
                         quirks=False, inplane_range=inplane_range, z_range=z_range, num_workers=num_workers)


def case_table(task: str | Path) -> list[dict]:
    """One row per synthetic case: phase, scan length, body range, lesions (kinds, largest diameter, faintest contrast)."""
    rows = []
    for c in read_json(Path(task) / "synthetic_cases.json"):
        les = c["lesions"]
        rows.append({"case": c["case"], "phase": c["phase"], "length mm": c["length_mm"],
                     "spacing mm": "x".join(f"{v:.2f}" for v in c["spacing"]),
                     "body z mm (liver dome 0)": f"{c['body_z_mm'][0]:.0f} to {c['body_z_mm'][1]:.0f}",
                     "lesions": len(les), "largest mm": max((x["diameter_mm"] for x in les), default=0.0),
                     "kinds": ", ".join(sorted({x["kind"] for x in les})),
                     "faintest HU": min((x["contrast_hu"] for x in les if "contrast_hu" in x), key=abs, default=None)})
    return rows


def make_sized_task(out_dir: str | Path, cases: list[tuple[tuple[int, int, int], tuple[float, float, float]]],
                    seed: int = 0, num_workers: int = 1) -> Path:
    """Write a synthetic MSD task of training cases of exactly these ((z, y, x) voxels, (z, y, x) mm spacing):
    int16 images, uint8 labels, no quirks (for measurements at real size, e.g. Task03's median 482 x 512 x 512)."""
    out = Path(out_dir)
    renew(out / "synthetic.json", {"sized_cases": [[list(sh), list(sp)] for sh, sp in cases], "seed": seed},
          lambda: shutil.rmtree(out))
    specs = [CaseSpec(f"liver_{i}", i, seed, tuple(float(n * s) for n, s in zip(sh, sp)), (sp[1], sp[1]),
                      (sp[0], sp[0]), "int16", "uint8", True, (tuple(sh), tuple(sp)))
             for i, (sh, sp) in enumerate(cases)]
    _write_task(out, specs, num_workers, quirks=False)
    write_json(TaskLayout(out).dataset_json, msd_dataset_json(list(range(len(cases))), []))
    return out


def _write_task(out: Path, specs: list[CaseSpec], num_workers: int, quirks: bool) -> None:
    """Every case's files (in `num_workers` processes), and with quirks the `._` shadow files."""
    map_cases(write_case, [(s, str(out)) for s in specs], num_workers, desc="synthetic cases")
    write_json(out / "synthetic_cases.json", [read_json(description_path(out, s.case_id)) for s in specs])
    if quirks:
        task = TaskLayout(out)
        for s in specs:
            for f in [task.image(s.case_id, test=not s.with_label)] + ([task.label(s.case_id)] if s.with_label else []):
                write_shadow(f)


def msd_dataset_json(train_ids: list[int], test_ids: list[int]) -> dict:
    """dataset.json with the keys of the MSD Task03 release."""
    return {
        "name": "Liver",
        "description": "Synthetic liver and tumour CT in the MSD Task03_Liver layout (unetpp_lib.prep.synthetic)",
        "reference": "synthetic, generated by unetpp_lib",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": dict(MSD_LABELS),
        "numTraining": len(train_ids),
        "numTest": len(test_ids),
        **dataset_entries([f"liver_{n}" for n in train_ids], [f"liver_{n}" for n in test_ids]),
    }
