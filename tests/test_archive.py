"""The MSD tarball as it comes: safe extraction, skipped macOS files, refused escapes, resume after a cut."""
import io as pyio
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from unetpp_lib.core import archive, io
from unetpp_lib.core.archive import ArchiveError, extract_msd_archive

TASK = "Task03_Liver"
DATASET = {"name": "Liver", "labels": {"0": "background", "1": "liver", "2": "cancer"}, "modality": {"0": "CT"},
           "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}], "test": []}


def tiny_nifti(tmp_path, value: int) -> bytes:
    """Bytes of a small NIfTI volume."""
    g = io.Geometry((4, 6, 5), (2.0, 0.8, 0.8), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return io.write_image(tmp_path / f"src_{value}.nii.gz", np.full(g.shape, value, np.int16), g).read_bytes()


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    """Append one member built by hand (names are kept exactly as given, '..' and '/' included)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, link, 1_700_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, pyio.BytesIO(data) if kind == tarfile.REGTYPE else None)


def msd_files(tmp_path) -> dict[str, bytes]:
    """The regular files of a tiny MSD task, by member name."""
    rng = np.random.default_rng(0)
    return {f"{TASK}/dataset.json": json.dumps(DATASET).encode(),
            f"{TASK}/imagesTr/liver_0.nii.gz": tiny_nifti(tmp_path, 100),
            f"{TASK}/labelsTr/liver_0.nii.gz": tiny_nifti(tmp_path, 1),
            f"{TASK}/imagesTs/liver_9.nii.gz": rng.bytes(300_000)}  # big enough to be cut in the middle


def build(path: Path, files: dict[str, bytes], extra=()) -> Path:
    """A tar (gzip for .tar.gz / .tgz) holding `files`, macOS shadow files and `extra` members."""
    mode = "w:gz" if path.name.endswith(("gz", "tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        add(tar, f"{TASK}/", kind=tarfile.DIRTYPE)
        for name, data in files.items():
            add(tar, name, data)
            folder, _, base = name.rpartition("/")
            add(tar, f"{folder}/._{base}", b"\x00\x05\x16\x07 Mac OS X shadow")
        add(tar, f"__MACOSX/{TASK}/._dataset.json", b"shadow")
        add(tar, f"{TASK}/dev_null", kind=tarfile.CHRTYPE)
        for member in extra:
            add(tar, *member)
    return path


@pytest.mark.parametrize("name", ["Task03_Liver.tar", "Task03_Liver.tar.gz", "Task03_Liver.tgz"])
def test_extracts_the_task_and_skips_macos_files(tmp_path, name, monkeypatch):
    files = msd_files(tmp_path)
    tar = build(tmp_path / name, files)
    task = extract_msd_archive(tar, tmp_path / "run" / "msd")
    assert task == tmp_path / "run" / "msd" / TASK
    for member, data in files.items():
        assert (tmp_path / "run" / "msd" / member).read_bytes() == data
    assert io.read_image(task / "imagesTr" / "liver_0.nii.gz")[0].max() == 100  # a readable NIfTI
    extracted = [p.name for p in (tmp_path / "run").rglob("*")]
    assert not [n for n in extracted if n.startswith("._") or n == "__MACOSX" or "partial" in n]
    assert "dev_null" not in extracted
    marker = json.loads(archive.marker_path(tar, tmp_path / "run" / "msd").read_text())
    assert marker["task"] == TASK and any("dev_null" in n for n in marker["notes"])

    def no_reading(*a, **k):
        raise AssertionError("a complete extraction must not be read again")

    monkeypatch.setattr(tarfile, "open", no_reading)
    assert extract_msd_archive(tar, tmp_path / "run" / "msd") == task  # at once, from the marker
    tar.unlink()  # deleted to free the disk once extracted: the extraction still stands
    assert extract_msd_archive(tar, tmp_path / "run" / "msd") == task


@pytest.mark.parametrize("bad", [
    ("../evil", b"x"),
    ("{outside}/abs_evil", b"x"),  # an absolute name
    (f"{TASK}/etc", b"", tarfile.SYMTYPE, "/etc"),
    (f"{TASK}/up", b"", tarfile.SYMTYPE, "../../outside"),
    (f"{TASK}/hard", b"", tarfile.LNKTYPE, "/etc/passwd"),
], ids=["dotdot", "absolute", "symlink_etc", "symlink_up", "hardlink_out"])
def test_malicious_members_are_refused(tmp_path, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    bad = (bad[0].format(outside=outside), *bad[1:])
    tar = build(tmp_path / "evil.tar", {f"{TASK}/dataset.json": b"{}"}, extra=[bad, (f"{TASK}/etc/evil", b"x")])
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(ArchiveError, match="evil.tar") as err:
        extract_msd_archive(tar, dest)
    assert "refused" in str(err.value)
    assert not list(outside.iterdir()) and not (tmp_path / "a" / "b" / "evil").exists()
    assert not (tmp_path / "a" / "evil").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "evil.tar"]
    assert all(dest in p.parents for p in written)
    assert not archive.marker_path(tar, dest).exists()


def test_all_at_once_and_an_inner_symlink(tmp_path):
    tar = build(tmp_path / "mixed.tar", msd_files(tmp_path), extra=[
        (f"{TASK}/link", b"", tarfile.SYMTYPE, "imagesTr"),  # inside: not created, the rest goes on
        (f"{TASK}/copy.nii.gz", b"", tarfile.LNKTYPE, f"{TASK}/imagesTr/liver_0.nii.gz")])
    task = extract_msd_archive(tar, tmp_path / "dest")
    assert not (task / "link").exists() and not (task / "link").is_symlink()
    assert (task / "copy.nii.gz").read_bytes() == (task / "imagesTr" / "liver_0.nii.gz").read_bytes()
    evil = build(tmp_path / "all_three.tar", {f"{TASK}/dataset.json": b"{}"}, extra=[
        (f"{TASK}/etc", b"", tarfile.SYMTYPE, "/etc"), ("../evil", b"x"), ("/tmp/unetpp_abs_evil", b"x")])
    with pytest.raises(ArchiveError, match="all_three.tar"):
        extract_msd_archive(evil, tmp_path / "dest2")
    assert not (tmp_path / "evil").exists() and not Path("/tmp/unetpp_abs_evil").exists()


def test_an_existing_link_in_the_target_is_not_written_through(tmp_path):
    outside, dest = tmp_path / "outside", tmp_path / "dest"
    outside.mkdir()
    dest.mkdir()
    (dest / TASK).symlink_to(outside)  # left by someone else: members must not follow it out
    with pytest.raises(ArchiveError, match="through a link"):
        extract_msd_archive(build(tmp_path / "ok.tar", msd_files(tmp_path)), dest)
    assert not list(outside.iterdir())


@pytest.mark.parametrize("name", ["Task03_Liver.tar", "Task03_Liver.tar.gz"])
def test_a_truncated_archive_fails_then_the_good_one_resumes(tmp_path, name):
    for folder in ("good", "cut"):  # the same name in two places: the marker could not mistake one for the other
        (tmp_path / folder).mkdir()
    good, cut = build(tmp_path / "good" / name, msd_files(tmp_path)), tmp_path / "cut" / name
    data = good.read_bytes()
    with tarfile.open(good) as t:
        big = t.getmember(f"{TASK}/imagesTs/liver_9.nii.gz")
    end = big.offset_data + big.size // 2 if name.endswith(".tar") else len(data) * 3 // 4
    cut.write_bytes(data[:end])
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=f"cut/{name}.*(corrupt|truncated)"):
        extract_msd_archive(cut, dest)
    first = dest / TASK / "imagesTr" / "liver_0.nii.gz"
    assert first.is_file() and not list(dest.rglob("*partial*"))  # whole files only
    inode = first.stat().st_ino
    task = extract_msd_archive(good, dest)
    assert first.stat().st_ino == inode  # kept, not written again
    assert (task / "imagesTs" / "liver_9.nii.gz").read_bytes() == msd_files(tmp_path)[f"{TASK}/imagesTs/liver_9.nii.gz"]


def test_a_cut_at_a_member_boundary_is_caught(tmp_path):
    good = build(tmp_path / "boundary.tar", msd_files(tmp_path))
    with tarfile.open(good) as t:
        offset = t.getmember(f"{TASK}/imagesTs/liver_9.nii.gz").offset  # the header of a member
    good.write_bytes(good.read_bytes()[:offset])  # what tarfile alone reads as a complete archive
    with pytest.raises(ArchiveError, match="boundary.tar"):
        extract_msd_archive(good, tmp_path / "dest")


def test_no_dataset_json_or_not_a_tar(tmp_path):
    tar = build(tmp_path / "other.tar", {"stuff/readme.txt": b"hello"})
    with pytest.raises(ArchiveError, match="other.tar.*no dataset.json"):
        extract_msd_archive(tar, tmp_path / "dest")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball at all" * 100)
    with pytest.raises(ArchiveError, match="junk.tar.gz.*corrupt"):
        extract_msd_archive(junk, tmp_path / "dest")
    with pytest.raises(ArchiveError, match="missing.tar.*not found"):
        extract_msd_archive(tmp_path / "missing.tar", tmp_path / "dest")


def test_convert_takes_the_tarball_as_msd_dir(synth_task, tmp_path):
    """01_convert's source: a .tar given as msd_dir is extracted into the run, then converted as a folder."""
    import tarfile

    from unetpp_lib import convert
    from unetpp_lib.core.layout import RunLayout

    tar = tmp_path / "Task03_Liver.tar"
    with tarfile.open(tar, "w") as t:
        t.add(synth_task, arcname="Task03_Liver")
    src = convert.task_source(tmp_path / "run", str(tar))
    assert src == RunLayout(tmp_path / "run").msd_archive / "Task03_Liver"
    report = convert.convert_task(src, tmp_path / "run" / "raw")
    assert not report.problems() and (tmp_path / "run" / "raw" / "dataset.json").is_file()
    assert {r.case for r in report.records} == {r.case for r in convert.verify_task(synth_task).records}
