"""01_convert: an MSD task folder becomes the run's raw dataset, every case verified on the way.

Output (`run_dir/raw/`, nnU-Net's names so data moves between the two; see layout.py):
training and test images with the channel suffix, labels, `dataset.json`, plus
`convert_report.json` (per case: shape, spacing, dtypes, labels).

Each case is read once (twice for sources not in .nii.gz): checked (readable, 3D, image/label geometry agree, declared
labels only, no NaN/Inf) and, if sound, written. Images are copied byte for byte, so
their voxels and geometry are carried over exactly; labels are rewritten as uint8 with
the image's geometry (copied too when they are uint8 with exactly that geometry already).
On the same read it gathers what 02_plan's fingerprint needs (spacing, shapes, crop box,
every 10th foreground intensity), so planning reads no image.
Problems of all cases are collected into one report; `dataset.json` is written only when
there are none, so later stages never start on a broken dataset. Every file is written
under a temporary name and renamed, and a per-case stamp is written last (currency.py's
rule: source files, declared labels, code version), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .core import currency
from .core.archive import extract_msd_archive, is_archive
from .core.io import (Geometry, atomic_path, copy_file, disk_space, last_line, read_header, read_json,
                      read_voxels_strict, remove_partials, write_image, write_json)
from .core.layout import RawLayout, RunLayout, TaskLayout, case_of_file, dataset_entries
from .core.pool import map_cases
from .prep.checks import FIX_REEXTRACT, DatasetError, Problem, check_image, check_label, check_pair
from .prep.synthetic import make_msd_task
from .prep.transforms import case_fingerprint

CODE = "convert-2"  # raised when what a converted case holds changes (2: the fingerprint gathered on the way)


@dataclass
class CaseRecord:
    """What verification found for one case and what conversion did with it."""

    case: str
    split: str  # "training" or "test"
    status: str = "checked"  # checked | converted | skipped | failed
    shape: list[int] = field(default_factory=list)  # (z, y, x)
    spacing: list[float] = field(default_factory=list)  # (z, y, x) mm
    image_dtype: str = ""
    label_dtype: str = ""
    hu_range: list[float] = field(default_factory=list)
    labels_present: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)  # training cases: spacing, shapes, crop box (02_plan reads it)


# ----------------------------------------------------------------------------- listing
def _rel(path: Path, root: Path) -> str:
    """Path relative to the task folder, for messages."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def read_task(msd_dir: str | Path) -> tuple[dict, list[dict], list[str]]:
    """dataset.json, the listed cases (case, split, image, label) and notes on files it does not list."""
    root = Path(msd_dir)
    ds_path = TaskLayout(root).dataset_json
    if not root.is_dir():
        raise DatasetError(str(root), [Problem("-", str(root), "task folder not found",
                                               "set msd_dir to the extracted Task03_Liver folder, or leave it empty for synthetic data")])
    try:
        ds = read_json(ds_path)
        entries = [(e["image"], e["label"], "training") for e in ds["training"]]
        entries += [(e if isinstance(e, str) else e["image"], None, "test") for e in ds.get("test", [])]
        labels = ds["labels"]
    except FileNotFoundError:
        raise DatasetError(str(root), [Problem("-", "dataset.json", "missing", FIX_REEXTRACT)]) from None
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(str(root), [Problem("-", "dataset.json", f"unreadable or lacks MSD keys ({e!r})",
                                               "restore dataset.json from the archive; it needs 'labels', 'training' and 'test'")]) from None
    if len(ds.get("modality", {"0": "CT"})) != 1:
        raise DatasetError(str(root), [Problem("-", "dataset.json", f"{len(ds['modality'])} modalities",
                                               "this kit segments single-channel CT; use one modality")])
    cases, seen, notes = [], set(), []
    for image, label, split in entries:
        name = Path(image).name
        if name.startswith("._"):
            notes.append(f"dataset.json lists macOS shadow file {image}: ignored")
            continue
        case = case_of_file(name)
        cases.append({"case": case, "split": split, "image": str(root / image),
                      "label": str(root / label) if label else None, "labels": sorted(int(k) for k in labels),
                      "duplicate": case in seen})
        seen.add(case)
    listed = {Path(c[k]).resolve() for c in cases for k in ("image", "label") if c[k]}
    for folder, path in TaskLayout(root).folders().items():
        for f in sorted(path.glob("*")):
            if not f.name.startswith("._") and f.resolve() not in listed:
                notes.append(f"{folder}/{f.name} is not listed in dataset.json: ignored")
    return ds, cases, notes


# ----------------------------------------------------------------------------- checks
def _read(case: str, path: str | None, root: Path, what: str) -> tuple[np.ndarray | None, Geometry | None, list[Problem]]:
    """Read one volume (geometry as ITK sees it, voxels strictly), turning every failure into a Problem."""
    rel = _rel(Path(path), root)
    if not Path(path).is_file():
        return None, None, [Problem(case, rel, f"{what} file missing",
                                    f"restore it ({FIX_REEXTRACT}) or remove the case from dataset.json")]
    try:
        geom, dim, channels = read_header(path)
        if geom is None or channels != 1:
            return None, None, [Problem(case, rel, f"{what} is {dim}D with {channels} channel(s)",
                                        "provide a 3D single-channel volume")]
        data = read_voxels_strict(path)
    except Exception as e:  # corrupt gzip, truncated file, not NIfTI: all mean the file is damaged
        return None, None, [Problem(case, rel, f"{what} cannot be read (corrupt or truncated gzip/NIfTI: "
                                    f"{type(e).__name__}: {last_line(e)})", FIX_REEXTRACT)]
    if data.shape != geom.shape:
        return None, None, [Problem(case, rel, f"{what} data shape {list(data.shape)} != header {list(geom.shape)}",
                                    FIX_REEXTRACT)]
    return data, geom, []


# ----------------------------------------------------------------------------- per case
def _outputs(raw: Path, case: str, split: str) -> tuple[Path, Path | None, Path]:
    """Image, label and marker paths of a case in the raw folder."""
    names = RawLayout(raw)
    if split == "training":
        return names.image(case), names.label(case), names.marker(case)
    return names.image(case, test=True), None, names.marker(case)


def _key(job: dict) -> dict:
    """What a converted case is made from: the source files, the declared labels, the tolerance, this code."""
    return currency.work_key({"image": job["image"], "label": job["label"]},
                             {"labels": job["labels"], "tol_mm": job["tol_mm"]}, CODE)


def _done(job: dict, raw: Path) -> dict | None:
    """The stored record of a case converted earlier from the same sources with the same rules, or None."""
    img_out, lab_out, marker = _outputs(raw, job["case"], job["split"])
    samples = RawLayout(raw).fingerprint_samples(job["case"]) if lab_out else None
    outputs = [p for p in (img_out, lab_out, samples) if p is not None]
    if not currency.is_current(marker, _key(job), outputs):
        return None
    return currency.recorded(marker)["record"]


def process_case(job: dict) -> CaseRecord:
    """Verify one case and, when `job['raw_dir']` is set and it is sound, write it."""
    case, root = job["case"], Path(job["root"])
    rec = CaseRecord(case, job["split"])
    raw = Path(job["raw_dir"]) if job["raw_dir"] else None
    if job["duplicate"]:  # before the resume shortcut: the first entry may already be converted
        rec.problems.append(Problem(case, _rel(Path(job["image"]), root), "case listed twice in dataset.json",
                                    "remove the duplicate entry"))
        rec.status = "failed"
        return rec
    if raw and (stored := _done(job, raw)):
        stored["problems"] = []
        return CaseRecord(**{**stored, "status": "skipped"})
    img, geom, probs = _read(case, job["image"], root, "image")
    rec.problems += probs
    if img is not None:
        rec.shape, rec.spacing, rec.image_dtype = list(geom.shape), [round(s, 5) for s in geom.spacing], str(img.dtype)
        rec.problems += check_image(case, _rel(Path(job["image"]), root), img)
        finite = img[np.isfinite(img)] if np.issubdtype(img.dtype, np.floating) else img
        rec.hu_range = [round(float(finite.min(initial=0)), 1), round(float(finite.max(initial=0)), 1)]
    lab, lgeom = None, None
    if job["label"]:
        lab_file = _rel(Path(job["label"]), root)
        lab, lgeom, probs = _read(case, job["label"], root, "label")
        rec.problems += probs
        if lab is not None:
            rec.label_dtype = str(lab.dtype)
            lab, rec.labels_present, probs = check_label(case, lab_file, lab, job["labels"])
            rec.problems += probs
            if geom is not None:
                rec.problems += check_pair(case, lab_file, geom, lgeom, job["tol_mm"])
    if rec.problems:
        rec.status = "failed"
        return rec
    if raw:
        samples = None
        if lab is not None:  # a training case: the fingerprint from the arrays already in memory
            rec.fingerprint, samples = case_fingerprint(img, lab, geom.spacing)
        _write_case(job, raw, rec, geom, lab, samples, label_as_is=lgeom == geom and rec.label_dtype == "uint8")
    return rec


def _write_case(job: dict, raw: Path, rec: CaseRecord, geom: Geometry, lab: np.ndarray | None,
                samples: np.ndarray | None, label_as_is: bool = False) -> None:
    """Image (exact copy), label (uint8, image geometry), fingerprint samples, then the case's stamp.

    A .nii.gz label that is already uint8 with exactly the image's geometry is copied byte for byte too."""
    img_out, lab_out, marker = _outputs(raw, rec.case, rec.split)
    if job["image"].endswith(".nii.gz"):
        copy_file(job["image"], img_out)
    else:
        write_image(img_out, sitk.GetArrayFromImage(sitk.ReadImage(job["image"])), geom)
    if lab_out is not None and label_as_is and job["label"].endswith(".nii.gz"):
        copy_file(job["label"], lab_out)
    elif lab_out is not None:
        write_image(lab_out, lab, geom)
    if samples is not None:
        with atomic_path(RawLayout(raw).fingerprint_samples(rec.case)) as tmp, open(tmp, "wb") as f:
            np.save(f, samples, allow_pickle=False)
    rec.status = "converted"
    currency.mark(marker, _key(job), record=asdict(rec))


# ----------------------------------------------------------------------------- task
@dataclass
class ConvertReport:
    """Per-case records and notes of one verification or conversion."""

    source: str
    records: list[CaseRecord]
    notes: list[str]

    def problems(self) -> list[Problem]:
        """All problems of all cases."""
        return [p for r in self.records for p in r.problems]

    def table(self):
        """One row per case (pandas DataFrame)."""
        import pandas as pd

        rows = [{**{k: v for k, v in asdict(r).items() if k != "problems"},
                 "problems": "; ".join(p.problem for p in r.problems)} for r in self.records]
        return pd.DataFrame(rows)

    def raise_for_problems(self) -> None:
        """Raise one DatasetError listing every problem, if there is any."""
        if self.problems():
            raise DatasetError(self.source, self.problems())


def _jobs(msd_dir: str | Path, raw_dir: str | Path | None, tol_mm: float) -> tuple[list[dict], list[str]]:
    """Per-case work items for `process_case`, and notes from listing the task."""
    _, cases, notes = read_task(msd_dir)
    jobs = [{**c, "root": str(msd_dir), "raw_dir": str(raw_dir) if raw_dir else None, "tol_mm": tol_mm}
            for c in cases]
    return jobs, notes


def verify_task(msd_dir: str | Path, num_workers: int = 1, tol_mm: float = 1e-3) -> ConvertReport:
    """Check every case of an MSD task folder without writing anything."""
    jobs, notes = _jobs(msd_dir, None, tol_mm)
    return ConvertReport(str(msd_dir), map_cases(process_case, jobs, num_workers, desc="verify"), notes)


def convert_task(msd_dir: str | Path, raw_dir: str | Path, num_workers: int = 1,
                 tol_mm: float = 1e-3) -> ConvertReport:
    """Verify and convert an MSD task folder into `raw_dir`; dataset.json only when every case is sound."""
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    remove_partials(raw)  # leftovers of a killed run
    RawLayout(raw).dataset_json.unlink(missing_ok=True)  # stale until this run succeeds
    jobs, notes = _jobs(msd_dir, raw, tol_mm)
    need = sum(f.stat().st_size for f in Path(msd_dir).rglob("*.nii*") if not f.name.startswith("._"))
    with disk_space(raw, need, "01_convert"):  # images are copied as they are, labels rewritten as uint8
        report = ConvertReport(str(msd_dir), map_cases(process_case, jobs, num_workers, desc="convert"), notes)
    write_json(RawLayout(raw).report, {"source": str(msd_dir), "notes": notes,
                                             "cases": [asdict(r) for r in report.records]})
    if not report.problems():
        ds, _, _ = read_task(msd_dir)
        write_json(RawLayout(raw).dataset_json, raw_dataset_json(ds, report.records))
    return report


def raw_dataset_json(msd: dict, records: list[CaseRecord]) -> dict:
    """nnU-Net v1 raw dataset.json: the MSD keys, file names without the channel suffix."""
    train = [r.case for r in records if r.split == "training"]
    test = [r.case for r in records if r.split == "test"]
    keep = {k: v for k, v in msd.items() if k not in ("training", "test", "numTraining", "numTest")}
    return {**keep, "numTraining": len(train), "numTest": len(test), **dataset_entries(train, test)}


def task_source(run_dir: str | Path, msd_dir: str = "", num_workers: int = 1, **synthetic: Any) -> Path:
    """The MSD folder to convert: `msd_dir` (a downloaded .tar/.tar.gz is extracted safely into
    `run_dir/msd_archive` first, once), else synthetic data generated into `run_dir/msd`."""
    if msd_dir and is_archive(msd_dir):  # by name, so a missing tarball gets the archive's own "not found"
        return extract_msd_archive(Path(msd_dir), RunLayout(run_dir).msd_archive)
    if msd_dir:
        return Path(msd_dir)
    return make_msd_task(RunLayout(run_dir).msd, num_workers=num_workers, **synthetic)


def case_files(raw_dir: str | Path, case: str = "") -> tuple[str, Path, Path | None]:
    """Name, raw image and label of `case` (empty: the first training case with a tumour, else the first)."""
    raw = Path(raw_dir)
    report = read_json(RawLayout(raw).report)["cases"]
    if not case:
        train = [r for r in report if r["split"] == "training"] or report
        case = next((r["case"] for r in train if 2 in r["labels_present"]), train[0]["case"])
    rec = next((r for r in report if r["case"] == case), None)
    if rec is None:
        raise KeyError(f"case {case!r} is not in {RawLayout(raw).report}; "
                       f"known: {', '.join(r['case'] for r in report)}")
    image, label, _ = _outputs(raw, case, rec["split"])
    return case, image, label
