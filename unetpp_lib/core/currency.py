"""One currency rule: work is current when its stamp records the key it would be made with now.

A key says what a unit of work is made from: its input files (size and modification
time, which change whenever a file is rewritten), the parameters that change its result,
and a code version that is raised when the code's output changes. The stamp is written
last, atomically, so an interrupted unit is never taken for a finished one. Every stage
uses the rule the same way:

| unit of work          | stamp                                   | when the key differs                  |
| --------------------- | --------------------------------------- | ------------------------------------- |
| synthetic data        | `msd/synthetic.json`                    | generated again                       |
| the MSD tarball       | `msd_archive/<tar>.extracted.json`      | extracted again (resumably)           |
| convert, one case     | `raw/.convert/<case>.json`              | verified and converted again          |
| fingerprint           | `preprocessed/fingerprint.json`         | gathered again                        |
| preprocess, one case  | `preprocessed/3d_fullres/<case>.json`   | preprocessed again                    |
| the preprocessed store| `preprocessed/3d_fullres/manifest.json` | training and validation refuse it     |
| training, to continue | the latest checkpoint's JSON sidecar    | training refuses to continue it       |
| predictions           | `validation/settings.json` (and ensemble)| discarded and predicted again        |
| a stage of run_all    | `stages/<unit>.json` (stamps.py)        | run again, and every stage after it   |

run_all's stage stamps follow the same rule with the stamps of the stages they read as
their inputs (a digest of each), so a changed input reruns everything downstream.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .io import read_json, write_json


def jsonable(value: Any) -> Any:
    """`value` as it compares after a JSON round trip (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


def file_id(path: str | os.PathLike) -> list[int] | None:
    """Size (bytes) and modification time (ns) of a file, which change when it is rewritten; None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def work_key(inputs: Mapping[str, str | os.PathLike | None] | None = None, params: Mapping[str, Any] | None = None,
             code: str = "") -> dict:
    """The key of a unit of work: its input files' ids, its parameters and the code version."""
    files = {name: file_id(path) for name, path in sorted((inputs or {}).items()) if path is not None}
    return jsonable({"inputs": files, "params": dict(params or {}), "code": code})


def digest(value: Any) -> str:
    """Short hash of a JSON-able value (a key over many files stays small)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def recorded(stamp: str | os.PathLike) -> dict | None:
    """The stamp's record, or None when there is none or it cannot be read (an old or damaged stamp)."""
    try:
        rec = read_json(stamp)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """The names whose values differ between a recorded and a new set of parameters (for error messages)."""
    old = old or {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def is_current(stamp: str | os.PathLike, key: Any, outputs: Iterable[str | os.PathLike] = ()) -> bool:
    """The stamp records `key` and every output is there."""
    rec = recorded(stamp)
    return rec is not None and rec.get("key") == jsonable(key) and all(Path(p).exists() for p in outputs)


def mark(stamp: str | os.PathLike, key: Any, **record: Any) -> Path:
    """Write the stamp (atomically, after the outputs): the key and what the unit wants to keep beside it."""
    return write_json(stamp, {"key": jsonable(key), **record})


def renew(stamp: str | os.PathLike, key: Any, discard_outputs: Callable[[], None]) -> bool:
    """For folders filled case by case: keep what is there only when the stamp records `key`, else
    `discard_outputs()` first; the stamp is written before any new output. True when outputs were kept."""
    rec = recorded(stamp)
    stale = Path(stamp).is_file() and (rec is None or rec.get("key") != jsonable(key))
    if stale:
        discard_outputs()
    mark(stamp, key)
    return not stale
