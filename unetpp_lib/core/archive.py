"""The MSD tarball as it comes: safe, resumable extraction of `Task03_Liver.tar` (or `.tar.gz`, `.tgz`).

Every member is checked by this module before anything is written (Python's `tarfile.data_filter`
is consulted as well where it exists, never alone): absolute names and names that climb out of
the target are refused, as are links pointing out of it; links inside it are not created (a
hard link becomes a copy of its target, a symbolic link is skipped, so no later member can be
written through one); device files, FIFOs, macOS `._*` shadow files, `__MACOSX/` and `.DS_Store`
are skipped. Each file is written to a temporary name and renamed when complete, with the
archive's size and time, so an interrupted extraction resumes by skipping the files already
there. A marker written after a complete pass makes the next call return at once.
"""
from __future__ import annotations

import gzip
import os
import posixpath
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from . import currency
from .io import atomic_path, read_json

SUFFIXES = (".tar", ".tar.gz", ".tgz")
SKIP_NAMES = ("__MACOSX", ".DS_Store")  # macOS leftovers, as `._*` files
FIX_DOWNLOAD = "Download it again (its size and checksum should match the MSD release) and rerun"


class ArchiveError(ValueError):
    """An archive that cannot be extracted safely or completely."""


def is_archive(path: str | os.PathLike) -> bool:
    """True for a name ending in `.tar`, `.tar.gz` or `.tgz` (what `msd_dir` may name instead of a folder;
    by name alone, so a missing archive gets the archive's 'not found' error)."""
    return Path(path).name.lower().endswith(SUFFIXES)


def marker_path(archive: Path, dest_root: Path) -> Path:
    """`dest_root/<archive name>.extracted.json`: written after a complete extraction."""
    return dest_root / f"{archive.name}.extracted.json"


def _key(archive: Path) -> dict:
    """What an extraction is made from (currency.py): the archive's name, size and modification time."""
    return currency.work_key({archive.name: archive}, code="extract-1")


def _done(archive: Path, dest_root: Path) -> Path | None:
    """The task folder of a complete earlier extraction of this archive (of any archive of this name once the
    archive itself was deleted to free the disk), else None."""
    marker = marker_path(archive, dest_root)
    if not marker.is_file():
        return None
    try:
        rec = read_json(marker)
        task = dest_root / rec["task"]
        same = not archive.exists() or rec["key"] == _key(archive)
    except (ValueError, KeyError, TypeError):
        return None
    return task if same and (task / "dataset.json").is_file() else None


def _parts(member: tarfile.TarInfo, archive: Path) -> tuple[str, ...]:
    """The member's path components, or ArchiveError for an absolute or escaping name."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive}: member {member.name!r} has an absolute path; refused (nothing written "
                           f"outside the target). The archive is not the MSD release. {FIX_DOWNLOAD}")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"{archive}: member {member.name!r} climbs out of the target folder ('..'); refused "
                           f"(nothing written outside the target). The archive is not the MSD release. {FIX_DOWNLOAD}")
    return parts


def _skipped(parts: tuple[str, ...]) -> bool:
    """macOS shadow files (`._*`), `__MACOSX/` and `.DS_Store`: never part of a dataset."""
    return any(p.startswith("._") or p in SKIP_NAMES for p in parts)


def _link_target(member: tarfile.TarInfo, parts: tuple[str, ...], archive: Path) -> tuple[str, ...]:
    """Components of a link's target, relative to the target folder; ArchiveError if it points outside it."""
    name = member.linkname.replace("\\", "/")
    # a symbolic link is relative to its own folder; a hard link names another member of the archive
    base = "/".join(parts[:-1]) if member.issym() else ""
    joined = posixpath.normpath(posixpath.join(base, name))
    if name.startswith("/") or joined in (".", "..") or joined.startswith("../"):
        kind = "symbolic" if member.issym() else "hard"
        raise ArchiveError(f"{archive}: member {member.name!r} is a {kind} link to {member.linkname!r}, outside "
                           f"the target folder; refused. The archive is not the MSD release. {FIX_DOWNLOAD}")
    return tuple(joined.split("/"))


def _second_opinion(member: tarfile.TarInfo, dest: Path, archive: Path) -> None:
    """Python's own 'data' filter (3.11.4+), in addition to the checks above."""
    if hasattr(tarfile, "data_filter"):
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as e:
            raise ArchiveError(f"{archive}: member {member.name!r} refused by tarfile's data filter ({e}). "
                               f"{FIX_DOWNLOAD}") from None


def _inside(path: Path, dest: Path, archive: Path, member: str) -> Path:
    """`path` itself, after checking that it does not lead out of `dest` through a link already on disk."""
    if not path.resolve().is_relative_to(dest):
        raise ArchiveError(f"{archive}: member {member!r} would be written through a link to "
                           f"{path.resolve()}, outside {dest}; remove that link from {dest} and rerun")
    return path


def _complete(path: Path, member: tarfile.TarInfo) -> bool:
    """A file left by an earlier pass: renamed only when whole, so the same size and time mean done."""
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and st.st_size == member.size and int(st.st_mtime) == int(member.mtime)


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, final: Path, source: Path | None) -> None:
    """Write one file (from the archive, or copied from `source` for a hard link) via a temporary name."""
    with atomic_path(final) as tmp:
        if source is not None:
            shutil.copyfile(source, tmp)
        else:
            with tar.extractfile(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(tmp, 0o644)
        os.utime(tmp, (member.mtime, member.mtime))


def _hard_link_source(member: tarfile.TarInfo, parts: tuple[str, ...], dest: Path, archive: Path) -> Path:
    """The already extracted file a hard link names (it is copied: no link is created)."""
    source = _inside(dest.joinpath(*_link_target(member, parts, archive)), dest, archive, member.name)
    if not source.is_file():
        raise ArchiveError(f"{archive}: hard link {member.name!r} points at {member.linkname!r}, which is not an "
                           f"earlier file of the archive. {FIX_DOWNLOAD}")
    return source


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, archive: Path,
                    notes: list[str]) -> tuple[str, ...] | None:
    """Check and extract one member; its components when it was kept, None when skipped."""
    parts = _parts(member, archive)
    if not parts or _skipped(parts):
        return None
    if member.issym():
        _link_target(member, parts, archive)  # one pointing outside refuses the archive
        notes.append(f"{member.name}: symbolic link not created")
        return None
    if not (member.isreg() or member.isdir() or member.islnk()):
        notes.append(f"{member.name}: device file or FIFO skipped")
        return None
    target = _inside(dest.joinpath(*parts), dest, archive, member.name)
    source = _hard_link_source(member, parts, dest, archive) if member.islnk() else None
    if source is None:
        _second_opinion(member, dest, archive)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return parts
    target.parent.mkdir(parents=True, exist_ok=True)
    # a hard link's size field is 0: it is copied again on every pass (MSD archives hold none)
    if source is not None or not _complete(target, member):
        _write_member(tar, member, target, source)
    return parts


def _check_end(tar: tarfile.TarFile) -> None:
    """tarfile takes a cut at a member boundary for the end: require the end-of-archive block (and, for
    gzip, read to the end so its length and CRC are checked)."""
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):
        raise EOFError("no end-of-archive block")
    while fileobj.read(1 << 20):
        pass


def _task_folder(kept: list[tuple[str, ...]], archive: Path, dest_root: Path) -> Path:
    """The folder holding dataset.json: the archive's top folder (`Task03_Liver`), or `dest_root` itself."""
    found = sorted({p[:-1] for p in kept if p[-1] == "dataset.json" and len(p) <= 2})
    if not found:
        raise ArchiveError(f"{archive}: no dataset.json at its top or in a top folder: not an MSD task archive. "
                           f"Point msd_dir at Task03_Liver.tar (or the extracted Task03_Liver folder)")
    if len(found) > 1:
        raise ArchiveError(f"{archive}: several dataset.json ({', '.join('/'.join(f) for f in found)}): one "
                           f"task per archive, please; extract it by hand and point msd_dir at one task folder")
    return dest_root.joinpath(*found[0])


def _extract_all(archive: Path, dest_root: Path) -> tuple[list[tuple[str, ...]], list[str]]:
    """One pass over the archive with a progress bar (bytes read, time left): the kept members' components
    and notes on what was skipped."""
    dest = dest_root.resolve()
    kept: list[tuple[str, ...]] = []
    notes: list[str] = []
    with open(archive, "rb") as raw, tqdm(total=archive.stat().st_size, desc=f"extract {archive.name}", unit="B",
                                          unit_scale=True, dynamic_ncols=True) as bar:
        try:
            with tarfile.open(fileobj=raw, mode="r:*") as tar:
                for member in tar:
                    parts = _extract_member(tar, member, dest, archive, notes)
                    if parts is not None:
                        kept.append(parts)
                    bar.update(raw.tell() - bar.n)
                _check_end(tar)
            bar.update(raw.tell() - bar.n)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):
                raise  # a full disk or a permission problem is not the archive's fault
            raise ArchiveError(f"{archive}: corrupt or truncated archive ({type(e).__name__}: {e}); files extracted "
                               f"so far are kept in {dest_root} and reused. {FIX_DOWNLOAD}") from None
    return kept, notes


def extract_msd_archive(archive: Path, dest_root: Path) -> Path:
    """Extract an MSD task archive (.tar, .tar.gz, .tgz) safely into `dest_root`; returns the task folder
    (`dest_root/Task03_Liver`). Resumable; a second call after a complete extraction returns at once."""
    archive, dest_root = Path(archive), Path(dest_root)
    if not archive.name.lower().endswith(SUFFIXES):
        raise ArchiveError(f"{archive}: not a .tar, .tar.gz or .tgz file; extract it by hand and set msd_dir to "
                           f"the task folder")
    done = _done(archive, dest_root)
    if done is not None:
        return done
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found; check msd_dir (a .tar, .tar.gz or .tgz file, or a folder)")
    dest_root.mkdir(parents=True, exist_ok=True)
    kept, notes = _extract_all(archive, dest_root)
    task = _task_folder(kept, archive, dest_root)
    currency.mark(marker_path(archive, dest_root), _key(archive), task=str(task.relative_to(dest_root)),
                  members_kept=len(kept), notes=notes)
    return task

