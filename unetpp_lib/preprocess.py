"""03_preprocess: crop, resample and normalise every training case into the chunked store.

Per case (nnU-Net v1's steps, with a faster resampler): crop to the nonzero box, move
the coarsest axis first, resample to the plans' spacing (image cubic, label per class
linear, coarse axis nearest when anisotropic), clip to the foreground 0.5/99.5
percentiles and z-score, sample voxel locations of each foreground class. Output in
`preprocessed/3d_fullres/`: `<case>.zarr` (see store.py), `<case>.json` (properties:
geometry, crop box, shapes) written last as the case's completion mark, and
`manifest.json` with the plans' preprocessing hash, which training and validation check.
A case is current when its properties record the key it would be made with now
(currency.py: its raw files, the plans' preprocessing hash, the store version).
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .core import currency
from .core.io import disk_space, is_disk_full, last_line, read_image_strict, read_json, remove_partials
from .core.layout import STAGE, PreLayout, RawLayout
from .core.pool import map_cases
from .prep.store import (STORE_DTYPE, STORE_VERSION, checksum, sample_locations, store_key, stored_bytes,
                         write_case)
from .prep.transforms import new_shape, preprocess_arrays
BYTES_PER_VOXEL = 28  # peak working memory per resampled voxel (float32 image, spline coefficients, gathers)
STORED_BYTES_PER_VOXEL = 0.6  # on disk, image and label (measured 0.49-0.53), for the space a store needs


def case_key(job: dict) -> dict:
    """What a preprocessed case is made from: its raw files, the plans' preprocessing hash, the store version."""
    return currency.work_key({"image": job["image"], "label": job["label"]},
                             {"plans_hash": job["plans"]["preprocessing_hash"]}, f"store-{STORE_VERSION}")


def preprocess_case(job: dict) -> dict:
    """Preprocess one raw case into the store (skipped when already done for these plans)."""
    pre, case, plans = PreLayout(job["pre_dir"]), job["case"], job["plans"]
    props_path, zarr_path = pre.case_properties(case), pre.case_store(case)
    phash, key = plans["preprocessing_hash"], case_key(job)
    if currency.is_current(props_path, key, [zarr_path]):
        return {**read_json(props_path), "status": "skipped"}
    t0 = time.perf_counter()
    try:
        img, geom = read_image_strict(job["image"])  # ~1.5x faster than ITK's reader, and a damaged file raises
        lab = read_image_strict(job["label"])[0].astype(np.uint8, copy=False) if job["label"] else None
        img_p, lab_p, props = preprocess_arrays(img, lab, geom.spacing, plans, dtype=STORE_DTYPE)
        locations = sample_locations(lab_p, job["seed"]) if lab_p is not None else {}
        write_case(zarr_path, img_p, lab_p, locations, plans["patch_size"])
    except (OSError, RuntimeError, ValueError) as e:
        if is_disk_full(e):  # not the raw data's fault: the stage names the folder and the space it needs
            raise
        raise RuntimeError(f"{case}: preprocessing {job['image']} failed ({type(e).__name__}: {last_line(e)}); "
                           f"rerun 01_convert to verify the raw data") from e
    props.update(case=case, plans_hash=phash, store_version=STORE_VERSION, geometry=geom.to_dict(),
                 classes_present=sorted(locations), num_locations={str(k): len(v) for k, v in locations.items()},
                 seconds=round(time.perf_counter() - t0, 3), bytes=stored_bytes(zarr_path),
                 checksum=checksum(zarr_path),
                 peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    currency.mark(props_path, key, **props)  # last: marks the case finished
    return {**props, "status": "preprocessed"}


def case_voxels(fingerprint: dict, plans: dict, case: str) -> int:
    """Voxels of a case before or after resampling, whichever is larger."""
    c, order = fingerprint["cases"][case], plans["transpose_forward"]
    shape, sp = [c["shape"][i] for i in order], [c["spacing"][i] for i in order]
    return int(max(np.prod(shape, dtype=np.float64),
                   np.prod(new_shape(shape, sp, plans["target_spacing"]), dtype=np.float64)))


def largest_case_voxels(fingerprint: dict, plans: dict) -> int:
    """Voxels of the largest case after resampling (before and after, whichever is larger)."""
    return max(case_voxels(fingerprint, plans, c) for c in fingerprint["cases"])


def worker_count(requested: int, largest_voxels: int, available_bytes: int | None = None) -> int:
    """Workers that fit in 80 % of the available memory with the largest case each (at least 1)."""
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    per_worker = largest_voxels * BYTES_PER_VOXEL + 300 * 2**20
    return max(1, min(requested, int(0.8 * available_bytes // per_worker)))


def preprocess_task(raw_dir: str | Path, pre_dir: str | Path, num_workers: int = 1, seed: int = 0,
                    cases: list[str] | None = None) -> list[dict]:
    """Preprocess the training cases (or just `cases`); write the manifest when all of them are done."""
    raw, pre = RawLayout(raw_dir), PreLayout(pre_dir)
    plans, fp = read_json(pre.plans), read_json(pre.fingerprint)
    out = pre.store
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)
    pre.manifest.unlink(missing_ok=True)  # valid again only when every case is done
    names = cases or sorted(fp["cases"])
    jobs = [{"case": c, "image": str(raw.image(c)), "label": str(raw.label(c)),
             "pre_dir": str(pre.root), "plans": plans, "seed": seed + i} for i, c in enumerate(names)]
    workers = worker_count(num_workers, largest_case_voxels(fp, plans))
    need = STORED_BYTES_PER_VOXEL * sum(case_voxels(fp, plans, c) for c in names)
    with disk_space(out, need, "03_preprocess"):
        records = map_cases(preprocess_case, jobs, workers, desc=f"preprocess ({workers} workers)")
    if cases is not None:
        return records  # a subset: the store is not declared complete
    voxels = sum(int(np.prod(r["shape_after_resampling"])) for r in records)
    total = sum(r["bytes"] for r in records)
    currency.mark(pre.manifest, store_key(plans["preprocessing_hash"]), **{
        "plans_hash": plans["preprocessing_hash"], "store_version": STORE_VERSION, "stage": STAGE,
        "num_cases": len(records), "cases": [r["case"] for r in records], "voxels": voxels, "bytes": total,
        "bytes_per_voxel": round(total / max(voxels, 1), 4), "workers": workers})
    return records
