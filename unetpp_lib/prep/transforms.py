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
    """The values of a label volume, sorted. For uint8 no whole-volume sort, bincount or fancy index (each casts to
    8-byte integers first: 1 GB for a 126 M-voxel CT, 1.4-7 s): the maximum is present, 0 is present unless every
    voxel is nonzero, and each value between is looked for with one comparison (~0.05 s in all for 3 classes)."""
    if lab.dtype != np.uint8:
        return np.unique(lab).astype(int).tolist()
    if lab.size == 0:
        return []
    flat = lab.ravel(order="K")  # memory order: no copy of a transposed volume
    hi = int(flat.max())
    if hi > 16:  # many values: mark them chunk by chunk
        seen = np.zeros(256, bool)
        for i in range(0, flat.size, chunk):
            seen[flat[i:i + chunk]] = True
        return np.flatnonzero(seen).tolist()
    values = [0] if np.count_nonzero(flat) < flat.size else []
    values += [v for v in range(1, hi) if (flat == v).any()]
    return values + [hi] if hi else values


def nonzero_bbox(img: np.ndarray, slab_voxels: int = 1 << 21) -> list[list[int]]:
    """[start, stop) per axis of the nonzero voxels (hole filling cannot change a bounding box).

    A CT is nonzero on every face (air is -1024 HU), which settles the box at once; else the volume is
    scanned a slab of axis 0 at a time, without a volume-sized mask."""
    full = [[0, n] for n in img.shape]
    if img.size == 0:
        return full
    faces = (np.take(img, end, axis=a) for a in range(img.ndim) for end in (0, -1))
    if all(np.any(face) for face in faces):
        return full
    hits = [np.zeros(n, bool) for n in img.shape]
    step = max(1, slab_voxels // max(1, int(np.prod(img.shape[1:]))))
    for i in range(0, img.shape[0], step):
        nz = img[i:i + step] != 0
        for axis in range(img.ndim):
            seen = nz.any(axis=tuple(a for a in range(img.ndim) if a != axis))
            if axis == 0:
                hits[0][i:i + step] = seen
            else:
                hits[axis] |= seen
    if not hits[0].any():
        return full
    return [[int(np.argmax(h)), int(len(h) - np.argmax(h[::-1]))] for h in hits]


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


def normalized(img: np.ndarray, norm: dict, dtype=np.float32, slab_voxels: int = 1 << 21) -> np.ndarray:
    """`normalize_ct` in float32 into a new array of `dtype`, a slab of axis 0 at a time, so no volume-sized float32
    temporary is made (the values `normalize_ct` gives on a float32 copy); `img` is left as it is."""
    out = np.empty(img.shape, dtype)
    step = max(1, slab_voxels // max(1, int(np.prod(img.shape[1:]))))
    for i in range(0, img.shape[0], step):
        out[i:i + step] = normalize_ct(img[i:i + step].astype(np.float32), norm)
    return out


def preprocess_arrays(img: np.ndarray, lab: np.ndarray | None, spacing, plans: dict, dtype=np.float32):
    """Crop, transpose, resample and normalise one case; returns (image in `dtype`, label, properties)."""
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
    if list(img.shape) == shape:  # straight from the raw voxels (resampling to the same shape is the identity)
        img = normalized(img, plans["normalization"], dtype)
    else:  # the resampled array is ours: normalised in place when it stays float32
        img = resample_image(img.astype(np.float32), shape, sp, target, res["image_order"])
        img = normalize_ct(img, plans["normalization"]) if np.dtype(dtype) == np.float32 else \
            normalized(img, plans["normalization"], dtype)
    if lab is not None:
        lab = resample_label(lab, shape, sp, target, res["label_order"])
    return img, lab, props
