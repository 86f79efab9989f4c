"""The names of a run folder: the one module that composes them (as nnU-Net v2's `paths.py`).

```
run_dir/
  msd/             synthetic MSD task, when no msd_dir is given (MSD names: imagesTr/<case>.nii.gz)
  msd_holdout/     held-out synthetic scans with labels (another seed, longer scans), when asked for
  raw/             imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, imagesTs/<case>_0000.nii.gz,
                   dataset.json, convert_report.json, .convert/<case>.json (per-case completion marks)
  preprocessed/    fingerprint.json, plans.json, splits.json, 3d_fullres/<case>.zarr + <case>.json, manifest.json
  fold_<k>/        plans.json (a copy: the folder predicts alone), train_config.json, train_log.json,
                   progress.png, checkpoint_<kind>.pt + .json, validation/, validation_postprocessed/,
                   test_predictions/, holdout[_postprocessed]/ (the held-out scans, predicted and scored)
  test_ensemble/, crossval_summary[_postprocessed].json/.csv, benchmark/, qa/, stages/, notebooks/, params.yaml
```
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NII = ".nii.gz"
CHANNEL = "_0000"  # nnU-Net v1's modality suffix on image files; the kit segments one CT channel
STAGE = "3d_fullres"  # nnU-Net v1's name of the preprocessed configuration
IMAGES_TR, LABELS_TR, IMAGES_TS = "imagesTr", "labelsTr", "imagesTs"
CHECKPOINT_KINDS = ("latest", "best", "final", "previous")  # previous: the latest before the last save


# ----------------------------------------------------------------------------- file-name rules
def case_of_file(path: str | Path) -> str:
    """Case of a file named `<case>.nii.gz` (v1's `[:-7]`), or the stem of another format."""
    name = Path(path).name
    return name[: -len(NII)] if name.endswith(NII) else Path(name).stem


CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net's `<case>_<channel>` image stems


def case_of_image(path: str | Path) -> str:
    """Case of an image file: `<case>_0000.nii.gz` (or `<case>.nii.gz`) -> `<case>`."""
    return case_of_file(path).removesuffix(CHANNEL)


def prediction_name(image: str | Path) -> str:
    """File name of the segmentation of an image: v1 drops the channel suffix (other names are kept)."""
    name = Path(image).name
    return name[: -len(CHANNEL + NII)] + NII if name.endswith(CHANNEL + NII) else name


def probabilities_path(segmentation: str | Path) -> Path:
    """Where the float16 probabilities saved beside a segmentation go: `<case>.nii.gz` -> `<case>.npz`."""
    seg = Path(segmentation)
    return seg.with_name(case_of_file(seg) + ".npz")


# uncertainty maps of a prediction, each uint8 percent 0-100 (nn/uncertainty.py): entropy of the mean softmax (of
# ln C, the most C classes can have), spread (mutual information over the averaged mirrorings, tiles and folds, of
# ln C) and confidence (the mean probability of the predicted class)
UNCERTAINTY_KINDS = ("entropy", "spread", "confidence")


def seg_name(case: str) -> str:
    """File name of a case's label or prediction: `<case>.nii.gz`."""
    return f"{case}{NII}"


def dataset_entries(train: list[str], test: list[str]) -> dict:
    """MSD / v1 dataset.json `training` and `test` lists (file names without the channel suffix)."""
    return {"training": [{"image": f"./{IMAGES_TR}/{c}{NII}", "label": f"./{LABELS_TR}/{c}{NII}"} for c in train],
            "test": [f"./{IMAGES_TS}/{c}{NII}" for c in test]}


@dataclass(frozen=True)
class _Folder:
    """A folder whose names one layout class knows; `root` may be given as a string."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


# ----------------------------------------------------------------------------- an MSD task folder
@dataclass(frozen=True)
class TaskLayout(_Folder):
    """An MSD task folder (`Task03_Liver`): image files carry no channel suffix."""

    def image(self, case: str, test: bool = False) -> Path:
        """`imagesTr/<case>.nii.gz` (or imagesTs)."""
        return self.root / (IMAGES_TS if test else IMAGES_TR) / seg_name(case)

    def label(self, case: str) -> Path:
        """`labelsTr/<case>.nii.gz`."""
        return self.root / LABELS_TR / seg_name(case)

    def folders(self) -> dict[str, Path]:
        """The three data folders by name."""
        return {f: self.root / f for f in (IMAGES_TR, LABELS_TR, IMAGES_TS)}

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"


# ----------------------------------------------------------------------------- raw/
@dataclass(frozen=True)
class RawLayout(_Folder):
    """The converted raw dataset in nnU-Net v1's names."""

    def image(self, case: str, test: bool = False) -> Path:
        """`imagesTr/<case>_0000.nii.gz` (or imagesTs)."""
        return self.root / (IMAGES_TS if test else IMAGES_TR) / f"{case}{CHANNEL}{NII}"

    def label(self, case: str) -> Path:
        """`labelsTr/<case>.nii.gz`."""
        return self.root / LABELS_TR / seg_name(case)

    def marker(self, case: str) -> Path:
        """Convert's per-case completion mark."""
        return self.root / ".convert" / f"{case}.json"

    def fingerprint_samples(self, case: str) -> Path:
        """Every 10th foreground intensity of a training case, gathered by convert for the fingerprint (.npy)."""
        return self.root / ".convert" / f"{case}.samples.npy"

    def test_images(self) -> list[Path]:
        """The test images, sorted."""
        return sorted((self.root / IMAGES_TS).glob(f"*{CHANNEL}{NII}"))

    def training_files(self) -> list[Path]:
        """Every training image and label file, sorted per folder."""
        return [f for d in (IMAGES_TR, LABELS_TR) for f in sorted((self.root / d).glob(f"*{NII}"))]

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def report(self) -> Path:
        return self.root / "convert_report.json"


# ----------------------------------------------------------------------------- preprocessed/
@dataclass(frozen=True)
class PreLayout(_Folder):
    """Fingerprint, plans, splits and the preprocessed store."""

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def store(self) -> Path:
        return self.root / STAGE

    @property
    def manifest(self) -> Path:
        return self.store / "manifest.json"

    def case_store(self, case: str) -> Path:
        """The case's zarr group."""
        return self.store / f"{case}.zarr"

    def case_properties(self, case: str) -> Path:
        """The case's properties JSON (its completion mark)."""
        return self.store / f"{case}.json"


# ----------------------------------------------------------------------------- a folder of predictions
@dataclass(frozen=True)
class PredLayout(_Folder):
    """Predictions (`<case>.nii.gz`) and what is written beside them: settings, timings, scores, QA pictures."""

    def case(self, case: str) -> Path:
        """The segmentation of a case."""
        return self.root / seg_name(case)

    def qa(self, case: str) -> Path:
        """The QA picture of a case."""
        return self.root / "qa" / f"{case}.png"

    @property
    def staging(self) -> Path:
        """Predictions before post-processing (the test ensemble's, moved out once post-processed)."""
        return self.root / "raw"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def per_case(self) -> Path:
        return self.root / "per_case.csv"

    @property
    def postprocessing(self) -> Path:
        return self.root / "postprocessing.json"

    @property
    def gallery(self) -> Path:
        return self.root / "gallery.png"

    @property
    def verdicts(self) -> Path:
        """The reviewer's verdict per case (05_validate's review browser); kept when the predictions are redone."""
        return self.root / "qa_review.csv"

    @property
    def lesions(self) -> Path:
        """One row per tumour lesion, reference and predicted (the review's headless report)."""
        return self.root / "lesions.csv"

    @property
    def uncertainty_png(self) -> Path:
        """What the uncertainty maps find (error detection, case ranking, lesion confidence): a picture."""
        return self.root / "qa" / "uncertainty.png"

    def uncertainty(self, case: str, kind: str = "entropy") -> Path:
        """A case's uncertainty map (`predict --save-uncertainty`): `uncertainty/<case>_<kind>.nii.gz`, uint8 percent
        0-100 in the segmentation's geometry; kinds UNCERTAINTY_KINDS."""
        if kind not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty map {kind!r}: use one of {UNCERTAINTY_KINDS}")
        return self.root / "uncertainty" / f"{case}_{kind}{NII}"


# ----------------------------------------------------------------------------- fold_<k>/
@dataclass(frozen=True)
class FoldLayout(_Folder):
    """A trained fold: everything inference needs sits here, so the folder can be copied alone."""

    def checkpoint(self, kind: str) -> Path:
        """`checkpoint_<kind>.pt`; its JSON sidecar is `sidecar(kind)`."""
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint {kind!r}: use one of {CHECKPOINT_KINDS}")
        return self.root / f"checkpoint_{kind}.pt"

    def sidecar(self, kind: str) -> Path:
        """`checkpoint_<kind>.json`, written after the weights: it marks the pair complete."""
        return self.checkpoint(kind).with_suffix(".json")

    def predictions(self, folder: str) -> PredLayout:
        """A prediction folder of this fold by name (`validation`, `validation_postprocessed`, ...)."""
        return PredLayout(self.root / folder)

    def all_checkpoints(self) -> list[Path]:
        """Every checkpoint and sidecar a training run may write."""
        return [p for k in CHECKPOINT_KINDS for p in (self.checkpoint(k), self.sidecar(k))]

    @property
    def plans(self) -> Path:
        """A copy of the run's plans, written beside every checkpoint: the folder predicts on its own."""
        return self.root / "plans.json"

    @property
    def train_config(self) -> Path:
        return self.root / "train_config.json"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.png"

    @property
    def validation(self) -> PredLayout:
        return PredLayout(self.root / "validation")

    @property
    def validation_postprocessed(self) -> PredLayout:
        return PredLayout(self.root / "validation_postprocessed")

    @property
    def test_predictions(self) -> PredLayout:
        return PredLayout(self.root / "test_predictions")

    @property
    def holdout(self) -> PredLayout:
        """The held-out synthetic scans (`run_dir/msd_holdout`) predicted by this fold and scored."""
        return PredLayout(self.root / "holdout")

    @property
    def holdout_postprocessed(self) -> PredLayout:
        """The held-out scans' predictions after the post-processing decided on this fold's validation."""
        return PredLayout(self.root / "holdout_postprocessed")


# ----------------------------------------------------------------------------- the run folder
@dataclass(frozen=True)
class RunLayout(_Folder):
    """Every path of a run folder."""

    @property
    def msd(self) -> Path:
        return self.root / "msd"

    @property
    def msd_holdout(self) -> Path:
        """Held-out labelled synthetic scans (MSD layout), predicted and scored by every fold's 05_validate."""
        return self.root / "msd_holdout"

    @property
    def msd_archive(self) -> Path:
        """Where an MSD tarball given as `msd_dir` is extracted (`msd_archive/Task03_Liver/`)."""
        return self.root / "msd_archive"

    @property
    def raw(self) -> RawLayout:
        return RawLayout(self.root / "raw")

    @property
    def pre(self) -> PreLayout:
        return PreLayout(self.root / "preprocessed")

    def fold(self, k: int) -> FoldLayout:
        """`fold_<k>/`."""
        return FoldLayout(self.root / f"fold_{k}")

    @property
    def test_ensemble(self) -> PredLayout:
        return PredLayout(self.root / "test_ensemble")

    def crossval_stem(self, folder: str = "validation") -> Path:
        """`crossval_summary` (+ `_postprocessed` for that folder), without suffix."""
        stem = "crossval_summary" if folder == "validation" else f"crossval_summary_{folder.split('_', 1)[-1]}"
        return self.root / stem

    @property
    def benchmark(self) -> Path:
        return self.root / "benchmark"

    @property
    def benchmark_json(self) -> Path:
        return self.benchmark / "benchmark.json"

    @property
    def qa(self) -> Path:
        return self.root / "qa"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    def stamp(self, name: str, suffix: str = ".json") -> Path:
        """`stages/<name><suffix>`: a finished stage's stamp (`.started.json`, `.lock`: its attempt, its lock)."""
        return self.root / "stages" / f"{name}{suffix}"
