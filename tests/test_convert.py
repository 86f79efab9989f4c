import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from unetpp_lib import convert
from unetpp_lib.core import io
from unetpp_lib.prep.checks import DatasetError


def training_cases(task: Path) -> list[str]:
    return [e["image"].split("/")[-1][:-7] for e in json.loads((task / "dataset.json").read_text())["training"]]


def test_convert_carries_images_exactly_and_labels_as_uint8(synth_task, tmp_path):
    raw = tmp_path / "raw"
    report = convert.convert_task(synth_task, raw)
    assert not report.problems() and report.notes == []
    for case in training_cases(synth_task):
        src, dst = synth_task / "imagesTr" / f"{case}.nii.gz", raw / "imagesTr" / f"{case}_0000.nii.gz"
        assert dst.read_bytes() == src.read_bytes()  # voxels, dtype and header untouched
        lab, g = io.read_image(raw / "labelsTr" / f"{case}.nii.gz")
        src_lab, g_src = io.read_image(synth_task / "labelsTr" / f"{case}.nii.gz")
        assert lab.dtype == np.uint8 and np.array_equal(lab, np.rint(src_lab))
        assert g == io.read_image(src)[1] == g_src
        copied = (raw / "labelsTr" / f"{case}.nii.gz").read_bytes() == (synth_task / "labelsTr" / f"{case}.nii.gz").read_bytes()
        assert copied == (src_lab.dtype == np.uint8)  # a uint8 label with the image's geometry is copied as it is
    dtypes = {r.case: r.label_dtype for r in report.records if r.split == "training"}
    assert "uint8" in dtypes.values() and set(dtypes.values()) - {"uint8"}  # both paths were taken
    assert sorted(p.name for p in (raw / "imagesTs").iterdir()) == ["liver_6_0000.nii.gz", "liver_7_0000.nii.gz"]
    assert not any(p.name.startswith("._") for p in raw.rglob("*"))  # shadow files never converted
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["training"][0] == {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}
    assert ds["numTraining"] == 5 and ds["numTest"] == 2 and ds["labels"]["2"] == "cancer"
    assert [r.status for r in report.records] == ["converted"] * 7


def test_rerun_skips_converted_cases_and_redoes_changed_ones(task_copy, tmp_path):
    raw = tmp_path / "raw"
    convert.convert_task(task_copy, raw, num_workers=2)
    stamp = {p: p.stat().st_mtime_ns for p in raw.rglob("*.nii.gz")}
    again = convert.convert_task(task_copy, raw)
    assert {r.status for r in again.records} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*.nii.gz")} == stamp
    assert again.table()["shape"].tolist() == convert.verify_task(task_copy).table()["shape"].tolist()
    src = task_copy / "imagesTr" / "liver_2.nii.gz"
    img, g = io.read_image(src)
    io.write_image(src, img + 1, g)  # the source changed: that case is converted again
    third = convert.convert_task(task_copy, raw)
    assert {r.case: r.status for r in third.records}["liver_2"] == "converted"
    assert sum(r.status == "converted" for r in third.records) == 1


def test_verify_writes_nothing(synth_task, tmp_path):
    before = sorted(synth_task.rglob("*"))
    report = convert.verify_task(synth_task, num_workers=2)
    assert {r.status for r in report.records} == {"checked"} and not report.problems()
    assert sorted(synth_task.rglob("*")) == before


def test_a_read_only_input_is_converted_and_never_written(task_copy, tmp_path):
    """msd_dir on a read-only mount: converting works and changes nothing there (files, sizes, times)."""
    def state():
        return sorted((p.relative_to(task_copy).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in task_copy.rglob("*"))

    for p in [task_copy, *task_copy.rglob("*")]:  # (root ignores the bits; the snapshot is what proves it)
        p.chmod(0o555 if p.is_dir() else 0o444)
    before = state()
    try:
        report = convert.convert_task(task_copy, tmp_path / "raw", num_workers=2)
        assert report.records and not report.problems()
        assert state() == before
    finally:
        for p in [task_copy, *task_copy.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


# --------------------------------------------------------------------------- defects
def _rewrite(path: Path, fn) -> None:
    img = sitk.ReadImage(str(path))
    out = fn(img)
    sitk.WriteImage(out, str(path), True)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage_gzip(path: Path) -> None:
    path.write_bytes(gzip.compress(b"not a nifti at all" * 10)[:-8] + b"\x00" * 8)


def make_4d(path: Path) -> None:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr])[None].astype(np.int16)), str(path))


def shift(attr: str, delta) -> callable:
    def fn(path: Path) -> None:
        def change(img):
            if attr == "shape":
                arr = sitk.GetArrayFromImage(img)[:-1]
                new = sitk.GetImageFromArray(arr)
                new.SetSpacing(img.GetSpacing()), new.SetOrigin(img.GetOrigin()), new.SetDirection(img.GetDirection())
                return new
            getter, setter = getattr(img, f"Get{attr}"), getattr(img, f"Set{attr}")
            setter(tuple(np.array(getter()) + np.array(delta)))
            return img
        _rewrite(path, change)
    return fn


def set_voxels(value, dtype=None) -> callable:
    def fn(path: Path) -> None:
        def change(img):
            arr = sitk.GetArrayFromImage(img).astype(dtype or sitk.GetArrayFromImage(img).dtype)
            arr.flat[: 5] = value
            new = sitk.GetImageFromArray(arr)
            new.CopyInformation(img)
            return new
        _rewrite(path, change)
    return fn


DEFECTS = {
    # name: (file to break, how, words expected in the message)
    "missing image": ("imagesTr", lambda p: p.unlink(), "image file missing"),
    "missing label": ("labelsTr", lambda p: p.unlink(), "label file missing"),
    "truncated gzip": ("imagesTr", truncate, "cannot be read"),
    "corrupt gzip": ("labelsTr", garbage_gzip, "cannot be read"),
    "4D image": ("imagesTr", make_4d, "4D"),
    "shape mismatch": ("labelsTr", shift("shape", None), "shape"),
    "spacing mismatch": ("labelsTr", shift("Spacing", (0.0, 0.0, 0.5)), "spacing"),
    "origin mismatch": ("labelsTr", shift("Origin", (3.0, 0.0, 0.0)), "origin"),
    "direction mismatch": ("labelsTr", shift("Direction", (0, 0, 0, 0, 0, 0, 0, 0, -2)), "direction"),
    "unknown label": ("labelsTr", set_voxels(3), "label values [3] not declared"),
    "non-integer label": ("labelsTr", set_voxels(1.5, np.float32), "non-integer"),
    "NaN in image": ("imagesTr", set_voxels(np.nan, np.float32), "NaN/Inf"),
    "Inf in label": ("labelsTr", set_voxels(np.inf, np.float32), "NaN/Inf"),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_is_caught_with_case_file_and_fix(task_copy, tmp_path, defect):
    folder, breaker, words = DEFECTS[defect]
    bad = task_copy / folder / "liver_3.nii.gz"
    breaker(bad)
    raw = tmp_path / "raw"
    report = convert.convert_task(task_copy, raw)
    with pytest.raises(DatasetError) as err:
        report.raise_for_problems()
    msg = str(err.value)
    assert "liver_3" in msg and f"{folder}/liver_3.nii.gz" in msg and words in msg and "fix:" in msg
    assert {p.case for p in err.value.problems} == {"liver_3"}
    assert not (raw / "dataset.json").exists()  # later stages cannot start on this dataset
    assert not (raw / "imagesTr" / "liver_3_0000.nii.gz").exists() and not (raw / "labelsTr" / "liver_3.nii.gz").exists()
    assert (raw / "imagesTr" / "liver_0_0000.nii.gz").exists()  # sound cases are kept for the rerun


def test_all_problems_of_all_cases_reported_at_once(task_copy, tmp_path):
    truncate(task_copy / "imagesTr" / "liver_1.nii.gz")
    set_voxels(7)(task_copy / "labelsTr" / "liver_2.nii.gz")
    shift("Spacing", (0.0, 0.0, 1.0))(task_copy / "labelsTr" / "liver_2.nii.gz")
    (task_copy / "imagesTs" / "liver_6.nii.gz").unlink()
    report = convert.verify_task(task_copy, num_workers=2)
    table = report.table()
    assert set(table.loc[table.status == "failed", "case"]) == {"liver_1", "liver_2", "liver_6"}
    with pytest.raises(DatasetError, match=r"4 problem\(s\) in 3 case\(s\)") as err:
        report.raise_for_problems()
    assert {(p.case, p.file) for p in err.value.problems} == {
        ("liver_1", "imagesTr/liver_1.nii.gz"), ("liver_2", "labelsTr/liver_2.nii.gz"),
        ("liver_6", "imagesTs/liver_6.nii.gz")}


def test_listing_problems_and_notes(task_copy, tmp_path):
    shutil.copy(task_copy / "imagesTr" / "liver_0.nii.gz", task_copy / "imagesTr" / "liver_99.nii.gz")
    _, cases, notes = convert.read_task(task_copy)
    assert notes == ["imagesTr/liver_99.nii.gz is not listed in dataset.json: ignored"]
    assert all(not c["case"].startswith("._") for c in cases)
    ds = json.loads((task_copy / "dataset.json").read_text())
    ds["training"].append(ds["training"][0])
    (task_copy / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(DatasetError, match="listed twice"):
        convert.verify_task(task_copy).raise_for_problems()
    (task_copy / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json: missing"):
        convert.verify_task(task_copy)
    with pytest.raises(DatasetError, match="task folder not found"):
        convert.verify_task(tmp_path / "nowhere")


# --------------------------------------------------------------------------- interruption
def test_interrupted_copy_leaves_no_half_written_file(synth_task, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    real_copy = shutil.copyfile

    def dying_copy(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])  # half of the file is on disk...
        if "liver_2" in str(src):
            raise KeyboardInterrupt  # ...when the user presses Ctrl-C
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_task(synth_task, raw)
    assert not list(raw.rglob("*liver_2*"))  # neither the image, a partial file nor a marker
    assert not list(raw.rglob("*.partial*")) and not (raw / "dataset.json").exists()
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    report = convert.convert_task(synth_task, raw)
    assert {r.case: r.status for r in report.records}["liver_0"] == "skipped"
    assert {r.case: r.status for r in report.records}["liver_2"] == "converted"
    assert (raw / "dataset.json").exists()


@pytest.mark.slow
def test_killed_convert_resumes_with_complete_files(synth_task, tmp_path):
    """SIGKILL in the middle (no cleanup runs): what is there is whole; a rerun finishes the job."""
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    stale = raw / "imagesTr" / "liver_9_0000.partial.nii.gz"
    stale.write_bytes(b"left by an earlier kill")
    code = ("import sys, time, shutil\n"
            "real = shutil.copyfile\n"
            "def slow(s, d):\n    time.sleep(0.3)\n    return real(s, d)\n"
            "shutil.copyfile = slow\n"
            "from unetpp_lib import convert\n"
            f"convert.convert_task({str(synth_task)!r}, {str(raw)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((raw / ".convert").glob("*.json")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((raw / ".convert").glob("*.json"))
    assert 1 <= len(done) < 7 and not (raw / "dataset.json").exists()
    for f in raw.rglob("*.nii.gz"):
        if ".partial" not in f.name:
            io.read_image(f)  # every final-named file is complete
    report = convert.convert_task(synth_task, raw)
    statuses = [r.status for r in report.records]
    assert "skipped" in statuses and "converted" in statuses and not report.problems()
    assert not list(raw.rglob("*.partial*"))
    for case in training_cases(synth_task):
        assert (raw / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == (synth_task / "imagesTr" / f"{case}.nii.gz").read_bytes()


def test_case_files_picks_a_tumour_case(synth_task, tmp_path):
    raw = tmp_path / "raw"
    convert.convert_task(synth_task, raw)
    case, image, label = convert.case_files(raw)
    assert image == raw / "imagesTr" / f"{case}_0000.nii.gz" and 2 in np.unique(io.read_image(label)[0])
    with pytest.raises(KeyError, match="liver_77"):
        convert.case_files(raw, "liver_77")


def test_duplicate_entry_is_caught_on_a_resumed_convert(task_copy, tmp_path):
    raw = tmp_path / "raw"
    convert.convert_task(task_copy, raw)  # liver_0 converted and marked done
    ds = json.loads((task_copy / "dataset.json").read_text())
    ds["training"].append(ds["training"][0])
    (task_copy / "dataset.json").write_text(json.dumps(ds))
    report = convert.convert_task(task_copy, raw)
    assert any("listed twice" in p.problem for p in report.problems())
    assert not (raw / "dataset.json").exists()
