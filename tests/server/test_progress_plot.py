"""progress.png is drawn beside the rounds: a round's end never waits for it, a run's end always does."""

from __future__ import annotations

import threading

import pytest

from fedpriv.server.progress_plot import PLOT_FILE, PlotData, ProgressPlots, draw
from fedpriv.server.round_tracker import RoundRecord, RoundTracker


def tracker_with(rounds: int, dp: bool = True) -> RoundTracker:
    tracker = RoundTracker(num_rounds=rounds, num_labels=2, dp_enabled=dp)
    for number in range(1, rounds + 1):
        record = RoundRecord(round=number)
        record.accuracy, record.macro_f1 = 0.5 + number / 100, 0.4 + number / 100
        record.epsilon = {"org-b": 1.5 * number, "org-a": float(number)} if dp else {}
        tracker.rounds.append(record)
    return tracker


def test_the_plot_data_is_a_copy_of_the_rounds_so_far():
    tracker = tracker_with(2)
    data = PlotData.of(tracker, {"org-a": 8.0, "org-b": 8.0, "org-c": 3.0})
    tracker.rounds.append(RoundRecord(round=3))  # the run goes on: the copy does not
    assert data.rounds == (1, 2)
    assert data.accuracy == (0.51, 0.52)
    assert data.epsilon == {"org-a": (1.0, 2.0), "org-b": (1.5, 3.0)}
    assert data.targets == (3.0, 8.0)


@pytest.mark.parametrize("dp", [True, False])
def test_draw_writes_a_png_atomically(tmp_path, dp):
    path = draw(tmp_path, PlotData.of(tracker_with(3, dp), {"org-a": 8.0}))
    assert path == tmp_path / PLOT_FILE
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLOT_FILE]  # no temporary file left behind


def test_a_rounds_end_does_not_wait_for_the_plot_and_the_newest_rounds_win(tmp_path):
    drawing, release = threading.Event(), threading.Event()
    drawn: list[tuple[int, ...]] = []

    def slow_drawer(run_dir, data):
        drawing.set()
        assert release.wait(30), "the test never released the drawer"
        drawn.append(data.rounds)

    plots = ProgressPlots(tmp_path, drawer=slow_drawer)
    plots.submit(tracker_with(1))
    assert drawing.wait(30)
    # the drawer is busy with round 1 (and blocks until released): these submissions return regardless
    plots.submit(tracker_with(2))
    plots.submit(tracker_with(3))
    assert drawn == []
    release.set()
    plots.close()  # waits for what is pending
    assert drawn == [(1,), (1, 2, 3)]  # round 2's numbers were replaced by round 3's before they were drawn
    assert plots.drawn == 2
    with pytest.raises(RuntimeError, match="after close"):
        plots.submit(tracker_with(4))


def test_a_plot_that_fails_costs_a_warning_line_and_later_plots_are_still_drawn(tmp_path):
    said: list[str] = []
    calls: list[int] = []

    def flaky_drawer(run_dir, data):
        calls.append(data.rounds[-1])
        if data.rounds[-1] == 1:
            raise OSError("No space left on device")

    plots = ProgressPlots(tmp_path, say=said.append, drawer=flaky_drawer)
    plots.submit(tracker_with(1))
    plots.close()
    assert said == [f"warning: {PLOT_FILE} not drawn after round 1: No space left on device"]
    plots = ProgressPlots(tmp_path, say=said.append, drawer=flaky_drawer)
    plots.submit(tracker_with(2))
    plots.close()
    assert calls == [1, 2] and plots.drawn == 1 and len(said) == 1


def test_close_without_rounds_draws_nothing(tmp_path):
    plots = ProgressPlots(tmp_path)
    plots.close()
    assert plots.drawn == 0 and not (tmp_path / PLOT_FILE).exists()


def test_the_last_rounds_confusion_matrix_is_drawn_beside_the_progress_plot(tmp_path):
    from fedpriv.server.progress_plot import CONFUSION_FILE

    tracker = tracker_with(2)
    tracker.label_names = ["business", "sports"]
    tracker.rounds[-1].confusion_matrix = [[7, 3], [1, 9]]
    data = PlotData.of(tracker)
    assert (data.label_names, data.confusion) == (("business", "sports"), ((7, 3), (1, 9)))
    draw(tmp_path, data)
    assert (tmp_path / CONFUSION_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFUSION_FILE, PLOT_FILE]
    tracker.rounds[-1].confusion_matrix = None  # not shared by every organisation: no matrix to draw
    assert PlotData.of(tracker).confusion is None
