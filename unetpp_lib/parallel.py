"""Per-case work over a process pool, with a progress bar and time estimate."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Sequence

from tqdm import tqdm


def map_cases(fn: Callable[[Any], Any], items: Sequence[Any], num_workers: int = 1,
              desc: str = "cases") -> list[Any]:
    """Apply `fn` to each item, in `num_workers` processes (<= 1: here); results in input order.

    `fn` must be a module-level function (it is pickled to the workers). An exception in
    one item is re-raised after cancelling the items not yet started.
    """
    results: list[Any] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="case", dynamic_ncols=True)
    try:
        if num_workers <= 1 or len(items) <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item)
                bar.update()
            return results
        pool = ProcessPoolExecutor(max_workers=min(num_workers, len(items)))
        try:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results
    finally:
        bar.close()
