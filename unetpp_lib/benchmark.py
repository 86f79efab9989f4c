"""Speed and size measurements of the stages (06_benchmark gathers them; each is usable alone)."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .io import read_image, read_json
from .preprocess import STAGE, preprocess_arrays, preprocess_task
from .resample import resample_image


def io_floor_seconds(raw_dir: str | Path, cases: list[str]) -> float:
    """Seconds to read and decompress every raw training image and label once (the I/O floor)."""
    raw = Path(raw_dir)
    t0 = time.perf_counter()
    for c in cases:
        read_image(raw / "imagesTr" / f"{c}_0000.nii.gz")
        read_image(raw / "labelsTr" / f"{c}.nii.gz")
    return time.perf_counter() - t0


def v2_like_bytes(raw_dir: str | Path, cases: list[str], plans: dict) -> tuple[int, int]:
    """(bytes, voxels) of nnU-Net v2's store for the same data: float32 image, int8 label, Blosc zstd 8 shuffle."""
    import numcodecs

    codec = numcodecs.Blosc("zstd", 8, numcodecs.Blosc.SHUFFLE)
    raw, total, voxels = Path(raw_dir), 0, 0
    for c in cases:
        img, geom = read_image(raw / "imagesTr" / f"{c}_0000.nii.gz")
        lab = read_image(raw / "labelsTr" / f"{c}.nii.gz")[0].astype(np.uint8)
        img_p, lab_p, _ = preprocess_arrays(img, lab, geom.spacing, plans)
        total += len(codec.encode(np.ascontiguousarray(img_p, np.float32)))
        total += len(codec.encode(np.ascontiguousarray(lab_p.astype(np.int8))))
        voxels += img_p.size
    return total, voxels


def resample_vs_ndimage(raw_dir: str | Path, case: str, plans: dict) -> dict:
    """Our separable cubic resampling against scipy.ndimage.zoom (order 3) on one case: time and difference."""
    from scipy import ndimage

    img, geom = read_image(Path(raw_dir) / "imagesTr" / f"{case}_0000.nii.gz")
    img = img.astype(np.float32)
    sp, target = list(geom.spacing), plans["target_spacing"]
    shape = [int(round(s / t * n)) for n, s, t in zip(img.shape, sp, target)]
    iso = [min(sp)] * 3  # compare the fully cubic path (no nearest-neighbour axis)
    t0 = time.perf_counter()
    ours = resample_image(img, shape, iso, iso, order=3)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ndimage.zoom(img, np.array(shape) / np.array(img.shape), order=3, mode="nearest", grid_mode=True)
    t_ref = time.perf_counter() - t0
    inner = tuple(slice(2, -2) if n > 8 else slice(None) for n in shape)
    return {"case": case, "shape_in": list(img.shape), "shape_out": shape, "ours_s": round(t_ours, 4),
            "ndimage_zoom_s": round(t_ref, 4), "speedup": round(t_ref / max(t_ours, 1e-9), 2),
            "max_abs_diff_interior_hu": float(np.abs(ours - ref)[inner].max())}


def benchmark_preprocess(raw_dir: str | Path, pre_dir: str | Path, num_workers: int = 1) -> dict:
    """Preprocess the training set afresh in a scratch folder and measure speed, memory and bytes."""
    pre = Path(pre_dir)
    plans, fp = read_json(pre / "plans.json"), read_json(pre / "fingerprint.json")
    cases = sorted(fp["cases"])
    raw_bytes = sum((Path(raw_dir) / sub / name).stat().st_size for c in cases
                    for sub, name in (("imagesTr", f"{c}_0000.nii.gz"), ("labelsTr", f"{c}.nii.gz")))
    floor = io_floor_seconds(raw_dir, cases)
    scratch = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    try:
        for name in ("plans.json", "fingerprint.json"):
            shutil.copy(pre / name, scratch / name)
        t0 = time.perf_counter()
        records = preprocess_task(raw_dir, scratch, num_workers=num_workers)
        seconds = time.perf_counter() - t0
        manifest = read_json(scratch / STAGE / "manifest.json")
        image_label = sum(sum(f.stat().st_size for f in (scratch / STAGE / f"{c}.zarr" / a).rglob("*") if f.is_file())
                          for c in cases for a in ("image", "label"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    v2_bytes, v2_voxels = v2_like_bytes(raw_dir, cases, plans)
    voxels = manifest["voxels"]
    return {
        "cases": len(cases), "workers": manifest["workers"], "seconds": round(seconds, 3),
        "cases_per_min": round(60 * len(cases) / seconds, 2), "raw_mb": round(raw_bytes / 1e6, 3),
        "raw_mb_per_s": round(raw_bytes / 1e6 / seconds, 3), "io_floor_s": round(floor, 3),
        "x_io_floor": round(seconds / max(floor, 1e-9), 2),
        "peak_rss_mb_per_worker": max(r["peak_rss_mb"] for r in records),
        "preprocessed_voxels": voxels, "bytes_per_voxel": manifest["bytes_per_voxel"],
        "image_label_bytes_per_voxel": round(image_label / voxels, 4),
        "nnunet_v2_like_bytes_per_voxel": round(v2_bytes / v2_voxels, 4),
        "x_nnunet_v2_bytes": round(manifest["bytes_per_voxel"] / (v2_bytes / v2_voxels), 3),
        "resampling": resample_vs_ndimage(raw_dir, max(cases, key=lambda c: np.prod(fp["cases"][c]["shape"])), plans),
    }
