"""Per-case work over a process pool, with a progress bar and a time estimate, and no silent deaths.

`map_cases` runs the work; `progress` is its bar for a loop in the calling process. At most `num_workers`
cases are in flight, so a worker the OS kills is named by its cases (`WorkerDied`); the workers end with
their parent (`lifetime.watch_parent`).
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from .lifetime import watch_parent


class WorkerDied(RuntimeError):
    """A worker process was killed (by the OS when memory ran out, or by a signal)."""


def _label(item: Any) -> str:
    """Case name of a work item for messages."""
    if isinstance(item, dict):
        return str(item.get("case", item))
    if isinstance(item, (tuple, list)) and item:
        return _label(item[0])
    return str(getattr(item, "case_id", item))


def map_cases(fn: Callable[[Any], Any], items: Sequence[Any], num_workers: int = 1,
              desc: str = "cases") -> list[Any]:
    """Apply `fn` to each item in `num_workers` processes (<= 1: here); results in input order.

    At most `num_workers` items are in flight, so a worker that dies is pinned to the
    case(s) it was working on: the error names them instead of the pool exiting silently.
    `fn` must be a module-level function (it is pickled to the workers).
    """
    results: list[Any] = [None] * len(items)
    bar = _bar(len(items), desc)
    try:
        if num_workers <= 1 or len(items) <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item)
                bar.update()
            return results
        _run_pool(fn, items, min(num_workers, len(items)), results, bar)
        return results
    finally:
        bar.close()


def _run_pool(fn, items, workers: int, results: list, bar) -> None:
    """Keep `workers` items in flight; turn a broken pool into WorkerDied naming those items."""
    pool = ProcessPoolExecutor(max_workers=workers, initializer=watch_parent)
    todo = list(enumerate(items))[::-1]
    running: dict = {}
    try:
        while todo or running:
            while todo and len(running) < workers:
                i, item = todo.pop()
                running[pool.submit(fn, item)] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                try:
                    results[i] = fut.result()
                except BrokenProcessPool:
                    cases = sorted({_label(items[j]) for j in [i, *running.values()]})
                    raise WorkerDied(
                        f"a worker process died (killed by the OS, most often for lack of memory) while "
                        f"working on {', '.join(cases)}. Finished cases are kept: run again, with fewer "
                        f"workers (num_workers) if memory is short.") from None
                bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _bar(total: int, desc: str) -> tqdm:
    """The per-case bar: cases done, elapsed < time left, rate (one redraw per case at most)."""
    return tqdm(total=total, desc=desc, unit="case", dynamic_ncols=True, mininterval=0.5)


def progress(items: Sequence[Any], desc: str) -> Iterator[Any]:
    """Iterate `items` in this process with map_cases' bar (cases done, time left)."""
    bar = _bar(len(items), desc)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
