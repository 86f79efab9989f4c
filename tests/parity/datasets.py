"""Small synthetic datasets for the planning and preprocessing parity tests.

`write_raw_task` writes a task straight in nnU-Net v1's raw layout (which is also ours after
01_convert) with a spacing and shape chosen per case, so slice count and thickness can vary
independently (the demo generator keeps the field of view fixed). `fingerprint_like` makes
a fingerprint without images, for the planner alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from unetpp_lib.core.io import Geometry, write_image, write_json
from unetpp_lib.core.labels import MSD_LABELS as LABELS
from unetpp_lib.prep.anatomy import draw_anatomy


def write_raw_task(out: Path, cases: list[tuple[tuple, tuple]], seed: int = 0, zero_border: int = 0) -> Path:
    """Cases given as ((z, y, x) spacing mm, (z, y, x) shape); every 2nd case gets a zero border of `zero_border` voxels."""
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    names = []
    for i, (spacing, shape) in enumerate(cases):
        rng = np.random.default_rng([seed, i])
        geom = Geometry(tuple(int(n) for n in shape), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0),
                        tuple(float(v) for v in np.eye(3).ravel()))
        img, lab = draw_anatomy(geom, rng)
        img = np.rint(img).astype(np.int16)
        if zero_border and i % 2 == 0:  # padding outside the scan, as some scanners write: v1 crops it away
            keep = tuple(slice(zero_border, n - zero_border) for n in shape)
            framed = np.zeros_like(img)
            framed[keep] = img[keep]
            img, lab = framed, np.where(framed != 0, lab, 0).astype(np.uint8)
        name = f"liver_{i}"
        write_image(out / "imagesTr" / f"{name}_0000.nii.gz", img, geom)
        write_image(out / "labelsTr" / f"{name}.nii.gz", lab.astype(np.uint8), geom)
        names.append(name)
    write_json(out / "dataset.json", {
        "name": "Liver", "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": LABELS,
        "numTraining": len(names), "numTest": 0, "test": [],
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names]})
    return out


def fingerprint_like(spacings, shapes, stats: dict | None = None) -> dict:
    """A fingerprint (our fingerprint.json's keys) from per-case spacings and cropped shapes."""
    stats = stats or {"mean": 99.4, "std": 39.4, "percentile_00_5": -17.0, "percentile_99_5": 201.0}
    return {"modality": {"0": "CT"}, "labels": dict(LABELS), "foreground_intensity": stats,
            "cases": {f"liver_{i}": {"spacing": [float(s) for s in sp], "shape": [int(n) for n in sh]}
                      for i, (sp, sh) in enumerate(zip(spacings, shapes))}}


def task03_like(num_cases: int = 131, seed: int = 4) -> dict:
    """Fingerprint varied like Task03: slices 0.7-5 mm, in-plane 0.56-1 mm, 512^2, 75-987 slices.

    Medians pinned to Task03's: spacing (1.0, 0.768, 0.768) mm, scan length ~482 mm.
    """
    rng = np.random.default_rng(seed)
    z = np.where(rng.random(num_cases) < 0.6, rng.uniform(0.69, 1.0, num_cases), rng.uniform(1.0, 5.0, num_cases))
    z = z / np.median(z)  # median slice spacing 1.0 mm
    inplane = rng.uniform(0.56, 1.0, num_cases)
    inplane = np.round(inplane - np.median(inplane) + 0.768, 4)
    length = rng.uniform(200, 760, num_cases)  # scan length varies independently of slice thickness
    length += 482 - np.median(length)
    slices = np.clip(np.round(length / z), 75, 987)
    return fingerprint_like(np.stack([z, inplane, inplane], 1),
                            np.stack([slices, [512] * num_cases, [512] * num_cases], 1))
