"""The predict command's input folder: its cases by file name (nnU-Net `<case>_0000` or MSD style), each image's
header checked, and `PredictError`, the command's one-line refusal of an input (the file and the fix).
"""
from __future__ import annotations

from pathlib import Path

from .io import last_line, read_header
from .layout import CHANNEL, CHANNEL_SUFFIX

NIFTI = (".nii.gz", ".nii")
NAMING_HELP = (f"Input names: nnU-Net style <case>{CHANNEL}.nii.gz (the CT channel) or MSD style <case>.nii.gz. "
               f"A folder whose every image name ends in _ and four digits is read nnU-Net style ({CHANNEL} is "
               "dropped from the output name); any other folder MSD style, one file per case. Outputs: "
               "OUT_DIR/<case>.nii.gz (uint8, the input's geometry). Subfolders and names starting with '.' "
               "are ignored; any other file that is not .nii.gz or .nii is an error.")


class PredictError(ValueError):
    """An input the command cannot predict: one line naming the file and the fix."""


def _stem(path: Path) -> str | None:
    """File name without .nii.gz / .nii, or None for a file that is not NIfTI."""
    return next((path.name[: -len(e)] for e in NIFTI if path.name.lower().endswith(e)), None)


def list_cases(images_dir: Path, num_channels: int = 1) -> dict[str, Path]:
    """Case -> CT image of a folder (sorted), after the naming, channel and header checks."""
    if not images_dir.is_dir():
        raise PredictError(f"{images_dir}: input folder not found; pass -i a folder of .nii.gz images")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    for p in files:
        if _stem(p) is None:
            raise PredictError(f"{p}: not a NIfTI image (.nii.gz or .nii); move it out of {images_dir}")
    if not files:
        raise PredictError(f"{images_dir}: no .nii.gz images in this folder; pass -i the folder that holds them")
    stems = {p: _stem(p) for p in files}
    matches = {p: CHANNEL_SUFFIX.match(s) for p, s in stems.items()}
    if not all(matches.values()):  # MSD style: one file per case
        return _unique({s: p for p, s in stems.items()}, files, images_dir)
    cases: dict[str, Path] = {}
    for p, m in matches.items():
        channel = int(m["channel"])
        if channel >= num_channels:
            raise PredictError(f"{p}: input channel {channel}, but the model's plans.json takes {num_channels} "
                               f"channel(s) ({CHANNEL} only for CT); remove the extra channel files from {images_dir}")
        if channel == 0:
            cases[m["case"]] = p
    missing = sorted({m["case"] for m in matches.values()} - set(cases))
    if missing:
        raise PredictError(f"{images_dir}: case {missing[0]} has no {missing[0]}{CHANNEL}.nii.gz (its CT channel); "
                           f"add it, or remove the case's other files")
    return _unique(cases, files, images_dir)


def _unique(cases: dict[str, Path], files: list[Path], images_dir: Path) -> dict[str, Path]:
    """`cases`, unless two files (`a.nii` and `a.nii.gz`) name the same case."""
    counts: dict[str, list[Path]] = {}
    for p in files:
        counts.setdefault(_stem(p), []).append(p)
    twice = [v for v in counts.values() if len(v) > 1]
    if twice:
        raise PredictError(f"{twice[0][0]} and {twice[0][1].name} are the same case in {images_dir}; keep one")
    return dict(sorted(cases.items()))


def check_image(path: Path) -> None:
    """A readable 3D single-component NIfTI, from its header alone."""
    try:
        _, dim, components = read_header(path)
    except RuntimeError as e:  # ITK's error for a file it cannot read
        raise PredictError(f"{path}: unreadable NIfTI ({last_line(e)}); replace the file") from None
    if dim != 3:
        raise PredictError(f"{path}: a {dim}D image; this command takes 3D CT volumes: save each volume as its "
                           f"own 3D file (<case>{CHANNEL}.nii.gz)")
    if components != 1:
        raise PredictError(f"{path}: {components} values per voxel, but the model takes one CT channel; save the "
                           f"CT channel alone as a 3D file")
