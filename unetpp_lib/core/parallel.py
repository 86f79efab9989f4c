"""Per-case work over a process pool, with a progress bar, a time estimate, no silent deaths and no orphans.

`map_cases` runs the work; `progress` is its bar for a loop in the calling process; `TerminalEcho`
shows such bars, redrawn in a kernel run by papermill, in run_all's terminal or log. `watch_parent`
ends a process (and the process group it leads) when its parent is gone, SIGKILL included: the
pool's workers, torchrun and its ranks call it; run_all's kernels call `end_with_parent`, which adds
a guard process that ends the kernel's group however the kernel ends. So nothing outlives a run;
`tagged` and `end_processes` find and end what a killed run of a stage may still have left.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

import psutil
from tqdm import tqdm


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


def duration(seconds: float) -> str:
    """`42 s`, `7 min 05 s` or `3 h 02 min`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


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


def _parent_gone(parent: int) -> bool:
    """Whether this process was re-parented (its parent exited, however it died)."""
    return os.getppid() != parent


def _end_self(group: bool) -> None:
    """SIGKILL this process's group when it leads one (its loader workers, pool workers, torchrun), else exit."""
    if group and os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


def watch_parent(group: bool = False, interval: float = 0.5) -> None:
    """End this process within `interval` s of its parent's exit (SIGKILL included), from a daemon thread.

    With `group`, a process that leads its process group (a Jupyter kernel, a torchrun rank: both start
    sessions of their own) takes the whole group with it: forked workers, DataLoader workers, torchrun."""
    expected = os.getppid()

    def poll() -> None:
        while not _parent_gone(expected):
            time.sleep(interval)
        _end_self(group)

    threading.Thread(target=poll, name="watch-parent", daemon=True).start()


def _state(line: str) -> str:
    """What a line redrawn with carriage returns (a progress bar) finally shows."""
    return next((part for part in reversed(line.split("\r")) if part.strip()), "")


class TerminalEcho:
    """A kernel's stdout and stderr (papermill's stdout_file / stderr_file) shown on `out`, indented: whole lines
    as they come; a progress bar's redraws (carriage returns) in place on a terminal, elsewhere (a pipe, a log)
    its state every `every` s and its last one, so a log gets no pages of redraws."""

    def __init__(self, out: TextIO, every: float = 30.0):
        self.out, self.every, self.tty = out, every, out.isatty()
        self.partial = {"stdout": "", "stderr": ""}  # each stream's text after its last newline
        self.bar, self.since = "", 0.0  # the bar state shown last, and when it was shown (or the bar began)

    def stream(self, name: str) -> SimpleNamespace:
        """A file-like object for one of the kernel's streams (papermill's stdout_file / stderr_file)."""
        return SimpleNamespace(write=partial(self.take, name), flush=self.out.flush)

    def take(self, name: str, text: str) -> None:
        """A chunk of one stream: show its whole lines, then the state of a bar still being drawn."""
        *lines, self.partial[name] = (self.partial[name] + text).split("\n")
        for line in lines:
            self._line(_state(line), bar="\r" in line)
        if "\r" in self.partial[name]:  # a bar being redrawn (a line still being written waits for its end)
            self._redraw(_state(self.partial[name]))
        self.out.flush()

    def _line(self, line: str, bar: bool = False) -> None:
        """A finished line (a bar's last state, cut to the terminal's width), unless a log shows it already."""
        if self.tty and self.bar:
            self.out.write("\r\x1b[K")
        if self.tty or line != self.bar:
            self.out.write(f"   {self._fit(line) if bar else line}\n")
        self.bar, self.since = "", 0.0

    def _fit(self, state: str) -> str:
        """A bar's state cut to the terminal's width (the kernel sizes its bar to it, before our indent)."""
        return state[:shutil.get_terminal_size().columns - 4] if self.tty else state

    def _redraw(self, state: str) -> None:
        """A bar's new state: in place on a terminal; as a line in a log when `every` s have passed."""
        if not state or state == self.bar:
            return
        now = time.time()
        if self.tty:
            self.out.write(f"\r\x1b[K   {self._fit(state)}")
        elif not self.since:
            self.since = now  # a bar begins: its first state is not worth a line in a log
            return
        elif now - self.since >= self.every:
            self.out.write(f"   {state}\n")
            self.since = now
        else:
            return
        self.bar = state

    def close(self) -> None:
        """End a bar left open on the terminal."""
        if self.tty and self.bar:
            self.out.write("\n")
        self.out.flush()


# the guard: a small process in its parent's group that SIGKILLs the group once the parent is gone
GUARD = """import os, signal, sys, time
parent, interval = int(sys.argv[1]), float(sys.argv[2])
while os.getppid() == parent:
    time.sleep(interval)
os.killpg(0, signal.SIGKILL)
"""


def end_with_parent(interval: float = 0.2) -> None:
    """For a process leading its own process group (a Jupyter kernel): end it when its parent is gone, and its
    group (forked and loader workers, torchrun) when it is gone, however it ended (its parent poller's
    os._exit, SIGKILL, the out-of-memory killer)."""
    if os.getpgid(0) != os.getpid():
        raise RuntimeError("end_with_parent: this process does not lead its process group; its group is not its own")
    watch_parent(group=True, interval=interval)
    subprocess.Popen([sys.executable, "-c", GUARD, str(os.getpid()), str(interval)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tagged(name: str, value: str) -> list[psutil.Process]:
    """Processes (other than this one and its ancestors) whose environment has `name=value`."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in mine and proc.environ().get(name) == value:
                found.append(proc)
        except (psutil.Error, OSError):  # gone, or another user's
            continue
    return found


def end_processes(procs: Iterable[psutil.Process], grace: float = 5.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL after `grace` s, the given processes; returns those that were alive."""
    procs = list(procs)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                proc.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        if not alive:
            break
    return procs
