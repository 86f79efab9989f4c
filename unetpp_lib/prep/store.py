"""The preprocessed case store: one chunked, compressed zarr group per case, and its readers.

`image` is float16 (the normalised CT; its 11-bit mantissa keeps ~0.001 of the
foreground std), `label` uint8, `locations` uint32 (N, 2) rows of (class, step from the
previous sorted flat index): the sampled voxels of every foreground class in one array,
~8x smaller than coordinates. Chunks are one patch per axis but at least 96 voxels, so
a training patch read decompresses at most 8 chunks (27 for the enlarged augmentation
patch), never the whole case; smaller chunks would read less but compress 7-10 % worse.
Each zarr array has a fixed cost of ~10 ms (metadata, chunk files), which dominates
the write of small cases; hence one locations array rather than one per class.
`check_preprocessed` refuses a store made for other plans; training and validation call it.
"""
from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ..core import currency
from ..core.io import Geometry, partial_name, read_json
from ..core.layout import PreLayout
from .transforms import plans_hash, values_present

MAX_LOCATIONS, MIN_COVERAGE = 10_000, 0.01  # foreground voxels sampled per class (nnU-Net's numbers)

STORE_VERSION = 2  # 2: properties carry target_spacing
STORE_DTYPE = np.float16  # of the image
# Byte shuffle beats bit shuffle on float16 CT by ~30 % (measured on the demo data). zstd level 1: on a
# 482x512x512 case 5.6x faster to write than level 5 (0.45 s vs 2.54 s) for 14 % more bytes (0.335 vs 0.293 B/voxel).
IMAGE_CODEC = dict(cname="zstd", clevel=1, shuffle="shuffle")
LABEL_CODEC = dict(cname="zstd", clevel=1, shuffle="bitshuffle")


def store_key(phash: str) -> dict:
    """The store's key (currency.py): the plans' preprocessing hash and the store version."""
    return currency.work_key(params={"plans_hash": phash}, code=f"store-{STORE_VERSION}")


class StalePreprocessedError(RuntimeError):
    """Preprocessed data that do not belong to the current plans."""


def chunk_shape(shape, patch_size, minimum: int = 96) -> tuple[int, ...]:
    """The patch size per axis, at least `minimum` voxels (small chunks compress worse), never beyond the array."""
    return tuple(int(max(1, min(n, max(minimum, p)))) for n, p in zip(shape, patch_size))


def _array(group: zarr.Group, name: str, data: np.ndarray, chunks, codec: dict) -> None:
    """Write one compressed array into the group."""
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             compressors=BloscCodec(**codec), fill_value=0)
    arr[...] = data


def write_case(path: str | Path, image: np.ndarray, label: np.ndarray | None,
               locations: dict[int, np.ndarray], patch_size, min_chunk: int = 96) -> Path:
    """Write a case group under a temporary name, then rename it into place."""
    final = Path(path)
    tmp = partial_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        chunks = chunk_shape(image.shape, patch_size, min_chunk)
        table = encode_locations(locations, image.shape)
        parts = [("image", image.astype(STORE_DTYPE, copy=False), chunks, IMAGE_CODEC),
                 ("locations", table, (max(1, len(table)), 2), LABEL_CODEC)]
        if label is not None:
            parts.append(("label", label.astype(np.uint8, copy=False), chunks, LABEL_CODEC))
        for part in parts:
            _array(group, *part)
        group.attrs["store_version"] = STORE_VERSION
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def open_case(path: str | Path) -> zarr.Group:
    """Open a case group read-only (arrays are read lazily, chunk by chunk)."""
    return zarr.open_group(str(path), mode="r")


def encode_locations(locations: dict[int, np.ndarray], shape) -> np.ndarray:
    """(N, 2) uint32 rows (class, step from the previous flat index of that class)."""
    rows = []
    for cls, pts in sorted(locations.items()):
        flat = np.sort(np.ravel_multi_index(tuple(np.asarray(pts, np.int64).T), tuple(shape)))
        rows.append(np.column_stack([np.full(len(flat), cls), np.diff(flat, prepend=0)]))
    return np.concatenate(rows).astype(np.uint32) if rows else np.zeros((0, 2), np.uint32)


def class_locations(group: zarr.Group) -> dict[int, np.ndarray]:
    """Sampled voxel coordinates (N, 3) of each foreground class."""
    table = group["locations"][...].astype(np.int64)
    shape = group["image"].shape
    return {int(c): np.stack(np.unravel_index(np.cumsum(table[table[:, 0] == c, 1]), shape), axis=1)
            for c in np.unique(table[:, 0])}


def stored_bytes(path: str | Path) -> int:
    """Bytes on disk of a case group."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def checksum(path: str | Path, block: int = 1 << 22) -> str:
    """CRC-32 of a case group: every file's name and bytes, in name order (about 1 GB/s)."""
    root, crc = Path(path), 0
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        crc = zlib.crc32(f.relative_to(root).as_posix().encode(), crc)
        with open(f, "rb") as fh:
            while chunk := fh.read(block):
                crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


class DamagedStoreError(RuntimeError):
    """A preprocessed case whose files no longer match the checksum recorded when it was written."""


def verify_cases(pre_dir: str | Path, cases: list[str]) -> None:
    """Check each case's stored files against the checksum in its properties (cases written before checksums were
    recorded pass). Damaged ones are marked to be redone (their properties and the manifest removed) and named in
    one error with the command that redoes only them."""
    pre, bad = PreLayout(pre_dir), []
    for case in cases:
        want = read_json(pre.case_properties(case)).get("checksum")
        if want and checksum(pre.case_store(case)) != want:
            bad.append(case)
    if bad:
        for case in bad:
            pre.case_properties(case).unlink()
        pre.manifest.unlink(missing_ok=True)
        raise DamagedStoreError(
            f"preprocessed case(s) {', '.join(bad)} in {pre.store}: the files no longer match the checksum written "
            f"with them (a damaged disk, or files edited or copied in part). They are marked to be redone: run "
            f"`python run_all.py --stages preprocess` (it redoes only these cases), then train again")


# ----------------------------------------------------------------------------- reading a finished store
def check_preprocessed(pre_dir: str | Path) -> dict:
    """The manifest, if the store is complete and made for the current plans.json; else a clear error."""
    pre = PreLayout(pre_dir)
    plans = read_json(pre.plans)
    manifest_path = pre.manifest
    if not manifest_path.is_file():
        raise StalePreprocessedError(f"{pre.store} is missing or incomplete (no manifest.json): "
                                     f"run 03_preprocess (python run_all.py --stages preprocess)")
    manifest = read_json(manifest_path)
    expected = plans_hash(plans)
    if manifest.get("key") != store_key(expected):
        raise StalePreprocessedError(
            f"{pre.store} was preprocessed for plans hash {manifest['plans_hash']} (store v{manifest.get('store_version')}), "
            f"but {pre.plans} now gives {expected} (store v{STORE_VERSION}): the plans changed after "
            f"preprocessing. Run 03_preprocess again (python run_all.py --stages preprocess); changed cases are redone.")
    return manifest


def case_properties(pre_dir: str | Path, case: str) -> dict:
    """Properties JSON of a preprocessed case, with its geometry as a Geometry."""
    props = read_json(PreLayout(pre_dir).case_properties(case))
    props["geometry"] = Geometry.from_dict(props["geometry"])
    return props


def sample_locations(lab: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """Per foreground class, up to 10,000 voxel coordinates (at least 1 % of the class), (N, 3)."""
    rng = np.random.default_rng(seed)
    flat = lab.ravel()
    foreground = np.flatnonzero(flat)  # one pass over the volume; the classes are split among these few voxels
    values = flat[foreground]
    out = {}
    for cls in values_present(values):
        idx = foreground[values == cls]  # ascending, as a search of the whole volume would give
        n = max(min(MAX_LOCATIONS, len(idx)), int(np.ceil(len(idx) * MIN_COVERAGE)))
        pick = np.sort(idx[rng.choice(len(idx), n, replace=False)])
        out[int(cls)] = np.stack(np.unravel_index(pick, lab.shape), axis=1).astype(np.int32)
    return out
