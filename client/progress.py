"""Progress inside one organisation's local training round, said on the node's side only (never sent).

A round of MiniLM on a loaded CPU takes minutes, and nothing used to show between the coordinator's round
lines. The training loop calls a ``RoundProgress`` after every step. On a terminal it redraws one line with
``\\r`` at most four times a second. Anywhere else (a deployed node's log file; a simulation, whose ClientApps
run in Ray actors and reach the user line by line through Ray's log forwarding) it writes one line every
``FEDPRIV_PROGRESS_S`` seconds (default 30; 0: none), and a closing line only for a round that wrote one, so
short rounds and simulations of many organisations add nothing to the output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from fedpriv.kernel.env_settings import env_number

INTERVAL_ENV = "FEDPRIV_PROGRESS_S"
DEFAULT_INTERVAL_S = 30.0
TTY_REDRAW_S = 0.25
# Ray folds lines that differ only in their numbers, from different actors, into "[repeated Nx across cluster]"
# (organisation names such as org-0 included): simulations/runner.py lets lines matching this through as they are
RAY_ALLOW_REGEX = r"^\[[^]]+ round [0-9]+/[0-9]+\] train"


def progress_interval(program: str = "fedpriv") -> float:
    """Seconds between progress lines when the output is not a terminal (``$FEDPRIV_PROGRESS_S``; 0: none)."""
    return env_number(program, INTERVAL_ENV, DEFAULT_INTERVAL_S, 0.0, 86_400.0, "a number of seconds")


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class RoundProgress:
    """Called as ``progress(steps_done, steps_planned, examples_seen)`` by the training loop; ``finish`` after it."""

    def __init__(
        self,
        org: str,
        server_round: int,
        num_rounds: int,
        *,
        stream: TextIO | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = f"[{org} round {server_round}/{num_rounds}]"
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = progress_interval() if interval_s is None else interval_s
        self.clock = clock
        self.started = self.last = clock()
        self.written = 0  # lines (or redraws) written
        self._width = 0

    def __call__(self, steps: int, planned: int, examples: int) -> None:
        if self.interval <= 0:
            return
        now = self.clock()
        if now - self.last < (TTY_REDRAW_S if self.tty else self.interval):
            return
        self.last = now
        elapsed = now - self.started
        share = f" ({min(100, round(100 * steps / planned))}%)" if planned else ""
        left = f", about {duration(elapsed / steps * (planned - steps))} left" if planned and steps else ""
        self._write(
            f"{self.prefix} training: step {steps}/{planned or '?'}{share},"
            f" {examples / max(elapsed, 1e-9):.1f} examples/s{left}"
        )

    def finish(self, steps: int, examples: int) -> None:
        """The round's closing line, where a progress line was written (a terminal's line ends here)."""
        if not self.written:
            return
        elapsed = self.clock() - self.started
        self._write(
            f"{self.prefix} trained: {steps} steps, {examples} examples in {duration(elapsed)}"
            f" ({examples / max(elapsed, 1e-9):.1f} examples/s)",
            final=True,
        )

    def stopped(self, why: str) -> None:
        """The closing line of a round that stopped part-way (a loss that became non-finite)."""
        if self.written:
            self._write(f"{self.prefix} stopped: {why}", final=True)

    def _write(self, text: str, final: bool = False) -> None:
        try:
            if self.tty:
                self.stream.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
                self._width = len(text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or full log: progress is for people, training goes on
            return
        self.written += 1
