"""Progress of the benchmark's phases: a tqdm bar on a terminal, a log line every few seconds otherwise."""
from __future__ import annotations

import sys
import time
from typing import Callable, Dict, Optional

Log = Callable[[str], None]


class Progress:
    """Progress over ``total`` iterations of interleaved steps (warm-up included), as a context manager.

    On a terminal (stderr is a TTY) a tqdm bar shows the last step time of each method; otherwise
    (a log file, a pipe) ``log`` gets one line at most every ``every`` seconds and one at the end,
    so a long phase is never silent and a log is not flooded. :meth:`step_done` is
    :func:`~greenmim.bench.step.time_interleaved`'s ``on_step``.
    """

    def __init__(self, phase: str, total: int, methods: int, log: Log, every: float = 10.0, terminal: Optional[bool] = None):
        self.phase, self.total, self.methods, self.log, self.every = phase, total, methods, log, every
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.last_ms: Dict[str, float] = {}
        self.done = 0  # iterations finished (every method stepped once)
        self._steps = 0
        self._t0 = self._last_line = time.perf_counter()
        self._bar = None

    def __enter__(self) -> "Progress":
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=f"[bench] {self.phase}", unit="step", file=sys.stderr, leave=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        self.log(f"[bench] {self.phase}: {self.done}/{self.total} steps per method in {time.perf_counter() - self._t0:.0f} s ({self._times()})")

    def warm(self) -> None:
        """The warm-up is over (``time_interleaved``'s ``on_warm``)."""
        if self._bar is None and self.done:
            self.log(f"[bench] {self.phase}: warm-up done ({self.done} steps per method, {self._times()})")
            self._last_line = time.perf_counter()

    def step_done(self, method: str, i: int, seconds: float) -> None:
        """One method's step ``i`` took ``seconds`` (``i < 0``: a warm-up step)."""
        self.last_ms[method] = seconds * 1e3
        self._steps += 1
        if self._steps % self.methods:
            return
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(self._times(), refresh=False)
            self._bar.update(1)
        elif time.perf_counter() - self._last_line >= self.every and self.done < self.total:
            self._last_line = time.perf_counter()
            self.log(f"[bench] {self.phase}: {self.done}/{self.total} steps per method, last {self._times()}")

    def _times(self) -> str:
        return ", ".join(f"{m} {ms:.0f} ms" for m, ms in self.last_ms.items()) or "no step yet"
