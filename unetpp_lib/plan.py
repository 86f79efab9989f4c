"""02_plan: dataset fingerprint, 3D full-resolution plans and cross-validation splits, all JSON.

The planning rules are those of nnU-Net v1's `ExperimentPlanner3D_v21`, the planner the
original UNet++ code used, so the same data gives the same plan (Task03: patch 128^3,
5 poolings of 2, 3x3x3 kernels, batch 2). Option `planner="unetpp"` sizes patch and batch
for UNet++'s real activation memory on a device of `device_memory_gb` instead of the
plain U-Net proxy the original used (about a third of what UNet++ needs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .core import currency
from .core.io import last_line, read_image, read_json, write_json
from .core.labels import MSD_LABELS
from .core.layout import PreLayout, RawLayout, case_of_file
from .core.pool import map_cases
from .prep.resample import ANISO_THRESHOLD
from .prep.transforms import case_fingerprint, plans_hash

# nnU-Net v1 constants (Generic_UNet / ExperimentPlanner)
REF_UNITS = 520_000_000 * 32 / 30  # activation budget of the proxy, scaled to 32 base features
REF_GB = 8.0  # the memory that budget stands for (batch 2 of a plain U-Net)
GB_PER_UNIT = REF_GB / (2 * REF_UNITS)  # so UNet++ at 128^3 is ~10.6 GB per sample, as the seed saw
DEFAULT_BATCH = 2
MIN_FMAP = 4  # pool while the feature map stays >= 4 voxels
MAX_POOL = 999  # per axis: v1's ExperimentPlanner sets no real cap (999); the feature-map rule stops it
OVERRIDABLE = ("batch_size", "patch_size", "target_spacing", "base_num_features", "max_num_features")
CODE = "fingerprint-1"  # raised when what the fingerprint holds changes


# ----------------------------------------------------------------------------- fingerprint
def fingerprint_case(job: dict) -> dict:
    """Spacing, shapes and crop box of one case, and every 10th foreground intensity (HU), read from its files."""
    try:
        img, geom = read_image(job["image"])
        lab, _ = read_image(job["label"])
    except (OSError, RuntimeError, ValueError) as e:
        raise RuntimeError(f"{job['case']}: cannot read {job['image']} or its label ({last_line(e)}); "
                           f"rerun 01_convert to verify the raw data") from e
    entry, samples = case_fingerprint(img, lab, geom.spacing)
    return {"case": job["case"], **entry, "samples": samples}


def gathered_case(raw: RawLayout, case: str) -> dict | None:
    """What 01_convert gathered for the fingerprint of `case` when it converted it, or None (then read the files)."""
    marker, samples = raw.marker(case), raw.fingerprint_samples(case)
    rec = currency.recorded(marker) or {}
    entry = rec.get("record", {}).get("fingerprint")
    if not entry or not samples.is_file():
        return None
    newest = max(raw.image(case).stat().st_mtime_ns, raw.label(case).stat().st_mtime_ns)
    if marker.stat().st_mtime_ns < newest:  # a raw file rewritten after conversion: its record is stale
        return None
    return {"case": case, **entry, "samples": np.load(samples, allow_pickle=False)}


def intensity_stats(values: np.ndarray) -> dict[str, float]:
    """Mean, std, min, max, median and 0.5/99.5 percentiles of foreground intensities."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no foreground voxels (label > 0) in any training case: check the labels")
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "median": float(np.median(v)), "percentile_00_5": float(np.percentile(v, 0.5)),
            "percentile_99_5": float(np.percentile(v, 99.5)), "num_samples": int(v.size)}


def compute_fingerprint(raw_dir: str | Path, num_workers: int = 1) -> dict:
    """Fingerprint of the raw training set (per case, and foreground intensities over all cases)."""
    raw = RawLayout(raw_dir)
    ds = read_json(raw.dataset_json)
    names = [case_of_file(e["image"]) for e in ds["training"]]
    gathered = {c: gathered_case(raw, c) for c in names}
    jobs = [{"case": c, "image": str(raw.image(c)), "label": str(raw.label(c))} for c in names if gathered[c] is None]
    read = {c["case"]: c for c in map_cases(fingerprint_case, jobs, num_workers, desc="fingerprint")} if jobs else {}
    cases = [gathered[c] or read[c] for c in names]
    samples = np.concatenate([c.pop("samples") for c in cases])
    return {"dataset": ds.get("name", ""), "modality": ds["modality"], "labels": ds["labels"],
            "num_cases": len(cases), "foreground_intensity": intensity_stats(samples),
            "cases": {c.pop("case"): c for c in cases}}


# ----------------------------------------------------------------------------- planning rules
def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """Median spacing; an axis much coarser and much shorter than the others takes its 10th percentile."""
    target = np.percentile(spacings, 50, axis=0)
    size = np.percentile(shapes, 50, axis=0)  # raw (unresampled) sizes, as v1.6.4 (v2.4 changed this)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    finest = min(target[others])  # v1 compares with the finest other axis, not the coarsest
    if target[worst] > ANISO_THRESHOLD * finest and size[worst] * ANISO_THRESHOLD < min(size[others]):
        t = np.percentile(spacings[:, worst], 10)
        if t < finest:  # never finer than the finest other axis
            t = max(finest, t) + 1e-5
        target[worst] = t
    return [float(v) for v in target]


def median_shape(spacings: np.ndarray, shapes: np.ndarray, target) -> np.ndarray:
    """Median over cases of each case's shape resampled to `target` (spacing x shape / target), rounded.

    Not median spacing x median shape: the two differ when slice count and thickness vary per case.
    """
    resampled = spacings / np.asarray(target, dtype=np.float64) * shapes
    return np.round(np.median(resampled, axis=0)).astype(int)


def pool_and_conv(spacing, patch, min_fmap: int = MIN_FMAP, max_pool: int = MAX_POOL):
    """Poolings per axis, pool and conv kernels, patch padded to be divisible, and the divisor."""
    spacing, size = [float(s) for s in spacing], [float(p) for p in patch]
    dim, num_pool, pools, convs = len(spacing), [0] * len(spacing), [], []
    while True:
        finest = min(spacing)
        valid = [i for i in range(dim) if spacing[i] / finest < 2]
        partners = max(([i for i in range(dim) if spacing[i] / spacing[a] < 2 and spacing[a] / spacing[i] < 2]
                        for a in range(dim)), key=len)
        conv = [3 if i in partners else 1 for i in range(dim)]
        valid = [i for i in valid if size[i] >= 2 * min_fmap and num_pool[i] < max_pool]
        if not valid:
            break
        kernel = [2 if i in valid else 1 for i in range(dim)]
        for i in valid:
            num_pool[i] += 1
            spacing[i] *= 2
            size[i] = np.ceil(size[i] / 2)
        pools.append(kernel)
        convs.append(conv)
    div = [2 ** n for n in num_pool]
    padded = [int(p + d - p % d) if p % d else int(p) for p, d in zip(patch, div)]
    return num_pool, pools, convs + [[3] * dim], padded, div


def activation_units(patch, pools, base: int, max_feat: int, n_in: int, n_cls: int,
                     arch: str = "unet", conv_per_stage: int = 2) -> int:
    """nnU-Net's memory proxy (feature-map voxels x channels), for a plain U-Net or for UNet++."""
    size = np.array(patch, dtype=np.float64)
    depth = len(pools)
    total = (n_in + n_cls) * np.prod(size)
    feats = base
    for level in range(depth + 1):
        if level:
            size = size / np.array(pools[level - 1])
            feats = min(feats * 2, max_feat)
        if arch == "unet":  # encoder + decoder convs and one transposed conv per level, bottleneck alone
            blocks = conv_per_stage * 2 + 1 if level < depth else conv_per_stage
        else:  # UNet++: X(i,0) plus (depth - i) nested nodes, each two convs and one transposed conv
            blocks = conv_per_stage + (depth - level) * (conv_per_stage + 1)
        total += blocks * np.prod(size) * feats
    if arch == "unetpp":
        total += depth * n_cls * np.prod(np.array(patch, dtype=np.float64))  # one head per X(0,j)
    return int(total)


def _fit_patch(spacing, median_shape, budget: float, units_of) -> tuple:
    """Shrink the patch (largest patch/median ratio first) until `units_of(patch, pools)` fits `budget`."""
    start = 1 / np.array(spacing)
    start = start / start.mean()
    start = np.round(start * (1 / min(start) * 512)).astype(int)  # ~512 mm box; v1's float steps, so ties round alike
    patch = [int(min(p, m)) for p, m in zip(start, median_shape)]
    num_pool, pools, convs, shape, div = pool_and_conv(spacing, patch)
    while units_of(shape, pools) > budget:
        axis = int(np.argsort(np.array(shape) / np.array(median_shape))[-1])
        trial = list(shape)
        trial[axis] -= div[axis]
        div_new = pool_and_conv(spacing, trial)[4]
        shape = list(shape)
        shape[axis] -= div_new[axis]
        num_pool, pools, convs, shape, div = pool_and_conv(spacing, shape)
    return num_pool, pools, convs, [int(s) for s in shape]


def plan_3d(fingerprint: dict, planner: str = "nnunet_v1", device_memory_gb: float = REF_GB,
            base: int = 32, max_feat: int = 320) -> dict:
    """3d_fullres plan from a fingerprint (rules of nnU-Net v1 ExperimentPlanner3D_v21)."""
    if planner not in ("nnunet_v1", "unetpp"):
        raise ValueError(f"planner {planner!r}: use nnunet_v1 (the original's rules) or unetpp")
    cases = list(fingerprint["cases"].values())
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    shapes = np.array([c["shape"] for c in cases], dtype=np.float64)
    raw_spacing = target_spacing(spacings, shapes)
    order = [int(np.argmax(raw_spacing))] + [i for i in range(3) if i != int(np.argmax(raw_spacing))]
    spacing = [raw_spacing[i] for i in order]  # network axis order: the coarsest axis first
    spacings, shapes = spacings[:, order], shapes[:, order]
    median = median_shape(spacings, shapes, spacing)
    n_in, n_cls = len(fingerprint["modality"]), len(fingerprint["labels"])
    arch = "unet" if planner == "nnunet_v1" else "unetpp"
    # v1: the plain U-Net proxy against its fixed reference; unetpp: two UNet++ samples must fit the device
    budget = REF_UNITS if planner == "nnunet_v1" else device_memory_gb / (DEFAULT_BATCH * GB_PER_UNIT)
    def units_of(shape, pools):
        return activation_units(shape, pools, base, max_feat, n_in, n_cls, arch)
    num_pool, pools, convs, patch = _fit_patch(spacing, median, budget, units_of)
    here = units_of(patch, pools)
    if planner == "nnunet_v1":
        batch = int(np.floor(max(REF_UNITS / here, 1) * DEFAULT_BATCH))
    else:
        batch = int(np.floor(device_memory_gb / (here * GB_PER_UNIT)))
    dataset_voxels = float(np.prod(median, dtype=np.float64)) * len(cases)
    cap = max(int(np.round(0.05 * dataset_voxels / np.prod(patch, dtype=np.float64))), DEFAULT_BATCH)
    batch = max(1, min(max(batch, DEFAULT_BATCH), cap))
    return {
        "planner": planner, "axes": "raw (z, y, x) permuted by transpose_forward, coarsest axis first",
        "transpose_forward": order, "target_spacing": spacing, "median_shape": median.tolist(),
        "patch_size": patch, "batch_size": batch, "num_pool_per_axis": num_pool,
        "pool_op_kernel_sizes": pools, "conv_kernel_sizes": convs, "base_num_features": base,
        "max_num_features": max_feat, "conv_per_stage": 2, "num_input_channels": n_in, "num_classes": n_cls,
        "do_dummy_2D_data_aug": bool(max(patch) / patch[0] > ANISO_THRESHOLD),
        "memory": {"units_per_sample": here, "arch": arch, "device_memory_gb": device_memory_gb,
                   "estimated_gb_per_sample": round(here * GB_PER_UNIT, 2)},
        "normalization": ct_normalization(fingerprint["foreground_intensity"]),
        "resampling": {"image_order": 3, "label_order": 1, "coarse_axis_order": 0, "aniso_threshold": ANISO_THRESHOLD},
    }


def ct_normalization(stats: dict) -> dict:
    """CT scheme: clip to the foreground 0.5/99.5 percentiles, then z-score with foreground mean/std."""
    return {"scheme": "CT", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
            "mean": stats["mean"], "std": stats["std"]}


# ----------------------------------------------------------------------------- overrides, splits
def apply_overrides(plans: dict, overrides: dict[str, Any]) -> dict:
    """Planned values replaced by the user's, recorded with the values they replaced."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"plan_overrides: unknown key(s) {unknown}; overridable: {list(OVERRIDABLE)}")
    out = dict(plans)
    for key, value in overrides.items():
        out[key] = value
    if "patch_size" in overrides:
        patch = [int(p) for p in overrides["patch_size"]]
        num_pool, pools, convs, padded, div = pool_and_conv(out["target_spacing"], patch)
        if padded != patch:
            raise ValueError(f"plan_overrides: patch_size {patch} is not divisible by {div} (its poolings); "
                             f"use {padded}")
        out.update(patch_size=patch, num_pool_per_axis=num_pool, pool_op_kernel_sizes=pools, conv_kernel_sizes=convs)
    out["overrides"] = {k: {"planned": plans.get(k), "used": out[k]} for k in overrides}
    return out


def make_splits(case_ids: list[str], n_splits: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net v1's folds (same as the seed's): the ids sorted as strings, shuffled by a RandomState(seed), cut into
    `n_splits` consecutive runs (the first n % n_splits one longer), each run a fold's validation, in sorted order;
    scikit-learn's KFold(n_splits, shuffle=True, random_state=seed) rule, written out (its import took ~1 s of 02_plan).

    Fewer cases than folds (tiny test sets) give one fold per case; a single case is its own validation.
    """
    keys = np.sort(np.array(case_ids))
    if len(keys) < 2:
        return [{"train": keys.tolist(), "val": keys.tolist()}]
    n_splits = min(n_splits, len(keys))
    order = np.arange(len(keys))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, len(keys) // n_splits)
    sizes[: len(keys) % n_splits] += 1
    folds = []
    for stop, size in zip(np.cumsum(sizes), sizes):
        val = np.zeros(len(keys), bool)
        val[order[stop - size:stop]] = True
        folds.append({"train": keys[~val].tolist(), "val": keys[val].tolist()})
    return folds


def check_splits(splits: Any, case_ids: list[str], source: str) -> list[dict[str, list[str]]]:
    """A user-provided splits list: every fold has train/val of known, non-overlapping cases."""
    known = set(case_ids)
    if not isinstance(splits, list) or not splits:
        raise ValueError(f"{source}: expected a list of {{'train': [...], 'val': [...]}}, one per fold")
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            raise ValueError(f"{source}: fold {k} must have exactly the keys 'train' and 'val'")
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            raise ValueError(f"{source}: fold {k} names cases not in the dataset: {unknown[:5]}")
        if set(fold["train"]) & set(fold["val"]):
            raise ValueError(f"{source}: fold {k} has cases in both train and val")
    return splits


def fingerprint_key(raw_dir: str | Path) -> dict:
    """The fingerprint's key (currency.py): dataset.json and every raw training file, and this code."""
    raw = RawLayout(raw_dir)
    ds_path = raw.dataset_json
    if not ds_path.is_file():
        raise FileNotFoundError(f"{ds_path} not found: run 01_convert first (it writes dataset.json only "
                                f"when every case passed verification)")
    files = currency.work_key({"dataset.json": ds_path, **{f"{f.parent.name}/{f.name}": f for f in raw.training_files()}})
    return {"inputs": currency.digest(files["inputs"]), "code": CODE}  # one hash: Task03 has 262 files


def plan_task(raw_dir: str | Path, out_dir: str | Path, num_workers: int = 1, planner: str = "nnunet_v1",
              device_memory_gb: float = REF_GB, overrides: dict | None = None,
              splits_file: str = "") -> tuple[dict, dict, list]:
    """Write fingerprint.json, plans.json and splits.json into `out_dir`; return them."""
    out = PreLayout(out_dir)
    key = fingerprint_key(raw_dir)
    if currency.is_current(out.fingerprint, key):  # gathered once per version of the raw data
        fp = read_json(out.fingerprint)
    else:
        fp = compute_fingerprint(raw_dir, num_workers)
        currency.mark(out.fingerprint, key, **fp)
        fp = read_json(out.fingerprint)
    plans = apply_overrides(plan_3d(fp, planner, device_memory_gb), overrides or {})
    plans["preprocessing_hash"] = plans_hash(plans)
    write_json(out.plans, plans)
    ids = sorted(fp["cases"])
    splits = check_splits(read_json(splits_file), ids, splits_file) if splits_file else make_splits(ids)
    write_json(out.splits, splits)
    return fp, plans, splits


def plan_summary(plans: dict) -> list[dict[str, Any]]:
    """Rows (setting, value, overridden) of the values people look at in a plan."""
    keys = ("target_spacing", "median_shape", "patch_size", "batch_size", "num_pool_per_axis",
            "pool_op_kernel_sizes", "conv_kernel_sizes", "base_num_features", "max_num_features",
            "transpose_forward", "do_dummy_2D_data_aug", "planner", "memory", "normalization", "preprocessing_hash")
    over = plans.get("overrides", {})
    return [{"setting": k, "value": json.dumps(plans[k]), "overridden": k in over} for k in keys]


def task03_plans() -> dict:
    """The Task03 3d_fullres plan (128^3, batch 2, 5 poolings) from the planner on Task03's fingerprint."""
    fp = {"modality": {"0": "CT"}, "labels": dict(MSD_LABELS),
          "foreground_intensity": {"mean": 99.4, "std": 39.4, "percentile_00_5": -17.0, "percentile_99_5": 201.0},
          "cases": {f"liver_{i}": {"spacing": [1.0, 0.768, 0.768], "shape": [482, 512, 512]} for i in range(131)}}
    plans = plan_3d(fp)
    plans["preprocessing_hash"] = plans_hash(plans)
    return plans
