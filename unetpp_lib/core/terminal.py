"""What run_all's terminal or log shows: a kernel's output echoed (`TerminalEcho`), durations in words (`duration`).

`TerminalEcho` shows a kernel's stdout and stderr (papermill's stdout_file / stderr_file): whole lines as they
come, a progress bar's redraws in place on a terminal, and in a log only its state now and then.
"""
from __future__ import annotations

import shutil
import time
from functools import partial
from types import SimpleNamespace
from typing import TextIO


def duration(seconds: float) -> str:
    """`42 s`, `7 min 05 s` or `3 h 02 min`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


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
