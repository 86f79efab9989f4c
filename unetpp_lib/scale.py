"""Preprocessing figures at real size: synthetic Task03-median cases through convert, plan and preprocess.

Writes N synthetic cases of Task03's median size (482 x 512 x 512 at 1 x 0.77 x 0.77 mm; with
`thick_case` the last one has 5 mm slices over the same field of view) in the MSD layout, then runs
the kit's own stages through their public calls (01_convert's `convert_task`, 02_plan's `plan_task`,
03_preprocess's `preprocess_task`), so it measures whatever they do today. Each stage is timed
from a clean folder, against the one-read time (every raw image and label read and decompressed
once, in one process); workers' peak memory is sampled while each stage runs.

Like `run_all.py` this sits above the stages and calls them in order; no stage imports it.
Standalone: `python -m unetpp_lib.scale --out DIR --cases N` prints the JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psutil

from . import convert, plan, preprocess  # the stages measured, called as notebooks 01-03 call them
from .perf.timing import io_floor_seconds  # the one-read time, as 06_benchmark measures it
from .core.io import read_json, read_voxels_strict, write_json
from .core.layout import PreLayout
from .prep.synthetic import make_sized_task

THICK_MM = 5.0  # slice thickness of the thick case (z mm)


def scale_cases(n_cases: int, shape, spacing, thick_case: bool) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """((z, y, x) voxels, (z, y, x) mm) per case; with `thick_case` the last has 5 mm slices, same field of view."""
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    cases = [(shape, spacing)] * n_cases
    if thick_case and n_cases:
        nz = max(1, round(shape[0] * spacing[0] / THICK_MM))
        cases[-1] = ((nz, *shape[1:]), (THICK_MM, *spacing[1:]))
    return cases


class RssSampler:
    """Peak resident memory (MB) of this process and of each of its child processes, sampled in a thread."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peaks, self._stop = interval_s, {}, threading.Event()
        self._me = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        """One look at this process and its children."""
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                rss = p.memory_info().rss / 2**20
            except psutil.Error:  # a worker that just ended
                continue
            if rss > 0:  # an ended worker not yet reaped (a zombie) reports 0
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0.0), rss)

    def _run(self) -> None:
        """Sample until stopped."""
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float | None]:
        """{'main': MB, 'worker': largest child MB, or None when no child was seen (the stage ran in this
        process, or its workers ended before the first sample)}."""
        workers = [v for pid, v in self.peaks.items() if pid != self._me.pid]
        return {"main": round(self.peaks.get(self._me.pid, 0.0), 1),
                "worker": round(max(workers), 1) if workers else None}


def timed(fn: Callable[[], Any]) -> tuple[Any, float, dict]:
    """(result, seconds, sampled peak RSS) of one call."""
    with RssSampler() as rss:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, rss.summary()


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file under `folder` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _file_ids(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time (ns) of each volume under a folder (empty when there is none)."""
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.rglob("*.nii.gz"))}


def _stages(msd: Path, raw: Path, pre: Path, num_workers: int) -> Iterator[tuple[str, float, dict]]:
    """Run convert, plan and preprocess through their public calls; yield (stage, seconds, peak RSS) each."""
    def _convert():
        report = convert.convert_task(msd, raw, num_workers=num_workers)
        report.raise_for_problems()
        return report

    steps = {"convert": _convert,
             "plan": lambda: plan.plan_task(raw, pre, num_workers=num_workers),
             "preprocess": lambda: preprocess.preprocess_task(raw, pre, num_workers=num_workers)}
    for name, fn in steps.items():
        out, seconds, rss = timed(fn)
        if name == "preprocess":
            rss["reported"] = max((r.get("peak_rss_mb", 0.0) for r in out), default=None)  # the workers' own
        yield name, seconds, rss


def preprocessing_at_scale(work_dir: str | Path, n_cases: int, shape=(482, 512, 512), spacing=(1.0, 0.77, 0.77),
                           thick_case: bool = True, num_workers: int = 2, seed: int = 0) -> dict:
    """Write `n_cases` real-size synthetic cases in `work_dir`/msd, run convert, plan and preprocess afresh on
    them with `num_workers`, and return seconds per stage, the one-read time and their ratio, peak RSS (MB),
    bytes per voxel of the store and disk per folder (MB); also written to `work_dir`/scale.json."""
    work = Path(work_dir)
    msd, raw, pre = work / "msd", work / "raw", work / "preprocessed"
    cases = scale_cases(n_cases, shape, spacing, thick_case)
    before = _file_ids(msd)
    t0 = time.perf_counter()
    make_sized_task(msd, cases, seed=seed, num_workers=num_workers)
    synth_s = time.perf_counter() - t0
    reused = bool(before) and _file_ids(msd) == before  # same settings: the cases were kept
    for folder in (raw, pre):  # every stage from scratch: a resumed stage would skip its cases
        shutil.rmtree(folder, ignore_errors=True)
    stages, peaks = {}, {}
    for name, seconds, rss in _stages(msd, raw, pre, num_workers):
        stages[f"{name}_s"], peaks[name] = round(seconds, 3), rss
    names = sorted(read_json(PreLayout(pre).fingerprint)["cases"])
    one_read = {"itk": io_floor_seconds(raw, names), "kit": io_floor_seconds(raw, names, read_voxels_strict)}
    chain = sum(stages.values())
    manifest = read_json(PreLayout(pre).manifest)
    return _result(work, cases, stages, chain, one_read, peaks, manifest, synth_s, reused, num_workers)


def _result(work: Path, cases, stages: dict, chain: float, one_read: dict, peaks: dict, manifest: dict,
            synth_s: float, reused: bool, num_workers: int) -> dict:
    """The JSON-able record of one measurement (also written to `work`/scale.json)."""
    pre = PreLayout(work / "preprocessed")
    result = {
        "cases": len(cases), "case_shapes": [list(s) for s, _ in cases], "case_spacings": [list(sp) for _, sp in cases],
        "num_workers": num_workers, "preprocess_workers": manifest.get("workers"),
        "n_voxels": int(sum(np.prod(s, dtype=np.int64) for s, _ in cases)),
        "n_voxels_preprocessed": int(manifest["voxels"]),
        "stages": stages, "chain_s": round(chain, 3),
        # the one-read floor with ITK's reader (as 06_benchmark has measured it from the start), and with the kit's
        # strict reader (ISA-L inflate, faster): the chain against each
        "one_read_s": round(one_read["itk"], 4), "ratio": _ratio(chain, one_read["itk"]),
        "one_read_kit_s": round(one_read["kit"], 4), "ratio_kit": _ratio(chain, one_read["kit"]),
        "peak_rss_mb": peaks,
        "store_bytes": int(manifest["bytes"]), "bytes_per_voxel": manifest["bytes_per_voxel"],
        "disk_mb": {name: round(folder_bytes(path) / 1e6, 3)
                    for name, path in (("msd", work / "msd"), ("raw", work / "raw"),
                                       ("preprocessed", pre.root), ("store", pre.store))},
        "synth_s_per_case": round(synth_s / max(len(cases), 1), 2), "synth_reused": reused,
    }
    write_json(work / "scale.json", result)
    return result


def _ratio(chain: float, one_read: float) -> float:
    """chain / one read, of the figures shown (rounded as they are)."""
    return round(round(chain, 3) / max(round(one_read, 4), 1e-4), 2)


def scale_table(result: dict) -> list[dict]:
    """Rows (measurement, value) of a `preprocessing_at_scale` result, for a table in the notebook."""
    s, rss = result["stages"], result["peak_rss_mb"]
    rows = [("cases (voxels)", f"{result['cases']} ({result['n_voxels'] / 1e6:.0f} M voxels)")]
    rows += [(f"{k[:-2]} s", v) for k, v in s.items()]
    rows += [("convert + plan + preprocess s", result["chain_s"]), ("one read s (ITK)", result["one_read_s"]),
             ("ratio (chain / one read, ITK)", f"{result['ratio']}x"),
             ("one read s (kit's reader, ISA-L)", result["one_read_kit_s"]),
             ("ratio (chain / one read, kit's reader)", f"{result['ratio_kit']}x")]
    rows += [(f"peak RSS MB, {stage}", _rss_text(v)) for stage, v in rss.items()]
    rows += [("store bytes / voxel", result["bytes_per_voxel"])]
    rows += [(f"disk MB, {k}", v) for k, v in result["disk_mb"].items()]
    rows += [("synthetic s / case", result["synth_s_per_case"] if not result["synth_reused"] else "reused")]
    return [{"measurement": k, "value": v} for k, v in rows]


def _rss_text(peaks: dict) -> str:
    """'worker W, main M' (MB) of a stage's sampled peaks."""
    parts = [f"{k} {v:.0f}" for k, v in peaks.items() if v is not None]
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    """CLI: measure at real size and print the JSON."""
    ap = argparse.ArgumentParser(prog="python -m unetpp_lib.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="work folder (synthetic msd/, raw/, preprocessed/, scale.json)")
    ap.add_argument("--cases", type=int, default=4, help="number of cases")
    ap.add_argument("--shape", type=int, nargs=3, default=[482, 512, 512], help="(z, y, x) voxels")
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.77, 0.77], help="(z, y, x) mm")
    ap.add_argument("--no-thick", action="store_true", help="no 5 mm case")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    result = preprocessing_at_scale(a.out, a.cases, tuple(a.shape), tuple(a.spacing), not a.no_thick, a.workers, a.seed)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
