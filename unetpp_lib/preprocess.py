"""03_preprocess: crop, resample and normalise every training case into the chunked store.

Per case (nnU-Net v1's steps, with a faster resampler): crop to the nonzero box, move
the coarsest axis first, resample to the plans' spacing (image cubic, label per class
linear, coarse axis nearest when anisotropic), clip to the foreground 0.5/99.5
percentiles and z-score, sample voxel locations of each foreground class. Output in
`preprocessed/3d_fullres/`: `<case>.zarr` (see store.py), `<case>.json` (properties:
geometry, crop box, shapes) written last as the case's completion mark, and
`manifest.json` with the plans' preprocessing hash, which training and validation check.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .io import Geometry, last_line, read_image, read_json, remove_partials, write_json
from .parallel import map_cases
from .plan import crop, nonzero_bbox, plans_hash
from .resample import resample_image, resample_label
from .store import STORE_VERSION, stored_bytes, write_case

STAGE = "3d_fullres"
BYTES_PER_VOXEL = 28  # peak working memory per resampled voxel (float32 image, spline coefficients, gathers)
MAX_LOCATIONS, MIN_COVERAGE = 10_000, 0.01  # foreground voxels sampled per class (nnU-Net's numbers)


class StalePreprocessedError(RuntimeError):
    """Preprocessed data that do not belong to the current plans."""


def normalize_ct(img: np.ndarray, norm: dict) -> np.ndarray:
    """Clip to the foreground percentiles, subtract the foreground mean, divide by its std (in place)."""
    np.clip(img, norm["clip"][0], norm["clip"][1], out=img)
    img -= norm["mean"]
    img /= max(norm["std"], 1e-8)
    return img


def sample_locations(lab: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """Per foreground class, up to 10,000 voxel coordinates (at least 1 % of the class), (N, 3)."""
    rng = np.random.default_rng(seed)
    flat = lab.ravel()
    out = {}
    for cls in np.unique(flat):
        if cls == 0:
            continue
        idx = np.flatnonzero(flat == cls)  # 1D search: much faster than argwhere on the volume
        n = max(min(MAX_LOCATIONS, len(idx)), int(np.ceil(len(idx) * MIN_COVERAGE)))
        pick = np.sort(idx[rng.choice(len(idx), n, replace=False)])
        out[int(cls)] = np.stack(np.unravel_index(pick, lab.shape), axis=1).astype(np.int32)
    return out


def new_shape(shape, spacing, target) -> list[int]:
    """round(old spacing / new spacing x old shape), per axis."""
    return [int(round(s / t * n)) for n, s, t in zip(shape, spacing, target)]


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


def _done(props_path: Path, zarr_path: Path, phash: str) -> bool:
    """Whether a case was finished with the same plans and store version."""
    try:
        props = read_json(props_path)
        return zarr_path.is_dir() and props["plans_hash"] == phash and props["store_version"] == STORE_VERSION
    except (OSError, ValueError, KeyError):
        return False


def preprocess_case(job: dict) -> dict:
    """Preprocess one raw case into the store (skipped when already done for these plans)."""
    out, case, plans = Path(job["out_dir"]), job["case"], job["plans"]
    props_path, zarr_path = out / f"{case}.json", out / f"{case}.zarr"
    phash = plans["preprocessing_hash"]
    if _done(props_path, zarr_path, phash):
        return {**read_json(props_path), "status": "skipped"}
    t0 = time.perf_counter()
    try:
        img, geom = read_image(job["image"])
        lab = read_image(job["label"])[0].astype(np.uint8) if job["label"] else None
        img_p, lab_p, props = preprocess_arrays(img, lab, geom.spacing, plans)
        locations = sample_locations(lab_p, job["seed"]) if lab_p is not None else {}
        write_case(zarr_path, img_p, lab_p, locations, plans["patch_size"])
    except (OSError, RuntimeError, ValueError) as e:
        raise RuntimeError(f"{case}: preprocessing {job['image']} failed ({type(e).__name__}: {last_line(e)}); "
                           f"rerun 01_convert to verify the raw data") from e
    props.update(case=case, plans_hash=phash, store_version=STORE_VERSION, geometry=geom.to_dict(),
                 classes_present=sorted(locations), num_locations={str(k): len(v) for k, v in locations.items()},
                 seconds=round(time.perf_counter() - t0, 3), bytes=stored_bytes(zarr_path),
                 peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    write_json(props_path, props)  # last: marks the case finished
    return {**props, "status": "preprocessed"}


def largest_case_voxels(fingerprint: dict, plans: dict) -> int:
    """Voxels of the largest case after resampling (before and after, whichever is larger)."""
    order, target = plans["transpose_forward"], plans["target_spacing"]
    sizes = []
    for c in fingerprint["cases"].values():
        shape = [c["shape"][i] for i in order]
        sp = [c["spacing"][i] for i in order]
        sizes.append(max(np.prod(shape, dtype=np.float64), np.prod(new_shape(shape, sp, target), dtype=np.float64)))
    return int(max(sizes))


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
    raw, pre = Path(raw_dir), Path(pre_dir)
    plans, fp = read_json(pre / "plans.json"), read_json(pre / "fingerprint.json")
    out = pre / STAGE
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)
    (out / "manifest.json").unlink(missing_ok=True)  # valid again only when every case is done
    names = cases or sorted(fp["cases"])
    jobs = [{"case": c, "image": str(raw / "imagesTr" / f"{c}_0000.nii.gz"), "label": str(raw / "labelsTr" / f"{c}.nii.gz"),
             "out_dir": str(out), "plans": plans, "seed": seed + i} for i, c in enumerate(names)]
    workers = worker_count(num_workers, largest_case_voxels(fp, plans))
    records = map_cases(preprocess_case, jobs, workers, desc=f"preprocess ({workers} workers)")
    if cases is not None:
        return records  # a subset: the store is not declared complete
    voxels = sum(int(np.prod(r["shape_after_resampling"])) for r in records)
    total = sum(r["bytes"] for r in records)
    write_json(out / "manifest.json", {
        "plans_hash": plans["preprocessing_hash"], "store_version": STORE_VERSION, "stage": STAGE,
        "num_cases": len(records), "cases": [r["case"] for r in records], "voxels": voxels, "bytes": total,
        "bytes_per_voxel": round(total / max(voxels, 1), 4), "workers": workers})
    return records


def check_preprocessed(pre_dir: str | Path) -> dict:
    """The manifest, if the store is complete and made for the current plans.json; else a clear error."""
    pre = Path(pre_dir)
    plans = read_json(pre / "plans.json")
    manifest_path = pre / STAGE / "manifest.json"
    if not manifest_path.is_file():
        raise StalePreprocessedError(f"{pre / STAGE} is missing or incomplete (no manifest.json): "
                                     f"run 03_preprocess (python run_all.py --stages preprocess)")
    manifest = read_json(manifest_path)
    expected = plans_hash(plans)
    if manifest["plans_hash"] != expected or manifest.get("store_version") != STORE_VERSION:
        raise StalePreprocessedError(
            f"{pre / STAGE} was preprocessed for plans hash {manifest['plans_hash']} (store v{manifest.get('store_version')}), "
            f"but {pre / 'plans.json'} now gives {expected} (store v{STORE_VERSION}): the plans changed after "
            f"preprocessing. Run 03_preprocess again (python run_all.py --stages preprocess); changed cases are redone.")
    return manifest


def case_properties(pre_dir: str | Path, case: str) -> dict:
    """Properties JSON of a preprocessed case, with its geometry as a Geometry."""
    props = read_json(Path(pre_dir) / STAGE / f"{case}.json")
    props["geometry"] = Geometry.from_dict(props["geometry"])
    return props
