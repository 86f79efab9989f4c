"""One case from raw arrays to the network's input: crop, transpose, resample, normalise.

Shared by preprocessing (which stores the result) and inference (which predicts on it),
so both see the same input; the fingerprint uses the same crop.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .resample import resample_image, resample_label


def plans_hash(plans: dict) -> str:
    """Hash of the plans' values that determine the transform's output (spacing, axes, normalisation, resampling)."""
    keys = ("transpose_forward", "target_spacing", "normalization", "resampling")
    blob = json.dumps({k: plans[k] for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def values_present(lab: np.ndarray, chunk: int = 1 << 22) -> list[int]:
    """The values of a label volume, sorted; for uint8, in 4 M-voxel chunks: a whole-volume bincount or fancy index would
    first cast it to 8-byte integers (1 GB for a 126 M-voxel CT) and took 1.4-7 s where this takes ~0.6 s."""
    if lab.dtype != np.uint8:
        return np.unique(lab).astype(int).tolist()
    seen = np.zeros(256, bool)
    flat = lab.ravel(order="K")  # memory order: no copy of a transposed (nibabel) volume
    for i in range(0, flat.size, chunk):
        seen[flat[i:i + chunk]] = True
    return np.flatnonzero(seen).tolist()


def nonzero_bbox(img: np.ndarray) -> list[list[int]]:
    """[start, stop) per axis of the nonzero voxels (hole filling cannot change a bounding box)."""
    nz = img != 0
    if not nz.any():
        return [[0, n] for n in img.shape]
    box = []
    for axis in range(img.ndim):
        hit = np.flatnonzero(nz.any(axis=tuple(a for a in range(img.ndim) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def crop(arr: np.ndarray, box: list[list[int]]) -> np.ndarray:
    """Cut `arr` to a bounding box."""
    return arr[tuple(slice(a, b) for a, b in box)]


def case_fingerprint(img: np.ndarray, lab: np.ndarray, spacing) -> tuple[dict, np.ndarray]:
    """Spacing, shapes and crop box of one training case, and every 10th foreground intensity (v1's sampling)."""
    box = nonzero_bbox(img)
    cropped, lab = crop(img, box), crop(lab, box)
    entry = {"spacing": [float(s) for s in spacing], "shape_before_crop": list(img.shape),
             "shape": list(cropped.shape), "crop_box": box}
    return entry, cropped[lab > 0][::10].astype(np.float32)


def new_shape(shape, spacing, target) -> list[int]:
    """round(old spacing / new spacing x old shape), per axis."""
    return [int(round(s / t * n)) for n, s, t in zip(shape, spacing, target)]


def normalize_ct(img: np.ndarray, norm: dict) -> np.ndarray:
    """Clip to the foreground percentiles, subtract the foreground mean, divide by its std (in place)."""
    np.clip(img, norm["clip"][0], norm["clip"][1], out=img)
    img -= norm["mean"]
    img /= max(norm["std"], 1e-8)
    return img


def preprocess_arrays(img: np.ndarray, lab: np.ndarray | None, spacing, plans: dict):
    """Crop, transpose, resample and normalise one case; returns (image, label, properties)."""
    box = nonzero_bbox(img)
    img = crop(img, box)
    lab = crop(lab, box) if lab is not None else None
    order = plans["transpose_forward"]
    img = np.transpose(img, order)
    lab = np.transpose(lab, order) if lab is not None else None
    sp = [float(spacing[i]) for i in order]
    target = plans["target_spacing"]
    shape = new_shape(img.shape, sp, target)
    props = {"crop_box": box, "transpose_forward": list(order), "shape_after_crop": list(img.shape),
             "spacing_transposed": sp, "target_spacing": list(target), "shape_after_resampling": shape}
    res = plans["resampling"]
    img = normalize_ct(resample_image(img.astype(np.float32), shape, sp, target, res["image_order"]),
                       plans["normalization"])
    if lab is not None:
        lab = resample_label(lab, shape, sp, target, res["label_order"])
    return img, lab, props
