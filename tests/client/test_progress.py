"""Progress inside a round: throttled lines in a log, a redrawn line on a terminal, silence for short rounds."""

from __future__ import annotations

import io

import pytest

from fedpriv.client.progress import INTERVAL_ENV, RoundProgress, progress_interval


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(progress: RoundProgress, clock: Clock, steps: int, seconds_per_step: float) -> None:
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        progress(step, steps, 16 * step)
    progress.finish(steps, 16 * steps)


def test_a_log_gets_one_line_per_interval_and_a_closing_line():
    clock, log = Clock(), io.StringIO()
    progress = RoundProgress("org-1", 2, 3, stream=log, interval_s=30, clock=clock)
    _run(progress, clock, steps=400, seconds_per_step=1.0)  # 400 s: 13 lines, not 400
    lines = log.getvalue().splitlines()
    assert len(lines) == 400 // 30 + 1 and "\r" not in log.getvalue()
    assert lines[0] == "[org-1 round 2/3] training: step 30/400 (8%), 16.0 examples/s, about 6m10s left"
    assert lines[-1] == "[org-1 round 2/3] trained: 400 steps, 6400 examples in 6m40s (16.0 examples/s)"


def test_a_short_round_and_an_interval_of_zero_write_nothing():
    clock, log = Clock(), io.StringIO()
    _run(RoundProgress("org-0", 1, 1, stream=log, interval_s=30, clock=clock), clock, steps=10, seconds_per_step=1)
    _run(RoundProgress("org-0", 1, 1, stream=log, interval_s=0, clock=clock), clock, steps=10, seconds_per_step=60)
    assert log.getvalue() == ""


def test_a_terminal_gets_one_line_redrawn_at_most_four_times_a_second():
    clock, tty = Clock(), Terminal()
    progress = RoundProgress("org-0", 1, 2, stream=tty, interval_s=30, clock=clock)
    _run(progress, clock, steps=100, seconds_per_step=0.05)  # 5 s: about 20 redraws, not 100
    text = tty.getvalue()
    assert 15 <= text.count("\r") <= 21 and text.count("\n") == 1 and text.endswith("\n")
    first, *_, last = text.split("\r")[1:]
    assert first.startswith("[org-0 round 1/2] training: step ") and last.startswith("[org-0 round 1/2] trained: 100")
    assert len(last) >= len(text.split("\r")[-2])  # the closing line covers the longer line it replaces


def test_the_interval_comes_from_the_environment_and_a_bad_value_is_one_line(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert progress_interval() == 30.0
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert progress_interval() == 0.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(SystemExit, match=f"{INTERVAL_ENV}='soon': expected a number of seconds between 0 and 86400"):
        progress_interval()
