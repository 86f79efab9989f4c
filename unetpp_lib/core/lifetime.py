"""Process lifetime: no process outlives a run, and what a killed run left can be found and ended.

`watch_parent` ends a process (and the process group it leads) when its parent is gone, SIGKILL included:
the pool's workers, torchrun and its ranks call it; run_all's kernels call `end_with_parent`, which adds a
guard process that ends the kernel's group however the kernel ends. `tagged` and `end_processes` find and
end what a killed run of a stage may still have left.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterable

import psutil


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
