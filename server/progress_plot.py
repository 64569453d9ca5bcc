"""``progress.png``: accuracy and privacy spent per round, and ``confusion.png``: the latest round's confusion
matrix (when the organisations share their per-class counts), drawn off the rounds' path.

Drawing the plot (and, the first time, importing matplotlib) took 0.2-0.8 s of
the coordinator's time after every round, between one round's evaluation and
the next round's first message, while every node waited. ``ProgressPlots``
takes a copy of the numbers at the end of a round and a background thread
draws them; when rounds end faster than a plot is drawn, the newest numbers
win. ``close`` waits for the last plot, so a finished run always has the plot
of its last round. The file is replaced atomically: a reader never sees half a
PNG. A plot that fails to draw costs a warning line, never the run.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpriv.kernel import atomic_files
from fedpriv.server.round_tracker import RoundTracker

PLOT_FILE = "progress.png"
CONFUSION_FILE = "confusion.png"


@dataclass(frozen=True)
class PlotData:
    """What the plot shows, copied out of the tracker (which the rounds go on changing)."""

    rounds: tuple[int, ...]
    accuracy: tuple[float | None, ...]
    macro_f1: tuple[float | None, ...]
    dp_enabled: bool
    epsilon: dict[str, tuple[float | None, ...]]  # organisation -> epsilon spent after each round
    targets: tuple[float, ...]  # the organisations' target epsilons (dashed lines)
    label_names: tuple[str, ...] = ()
    confusion: tuple[tuple[int, ...], ...] | None = None  # the last round's [true][predicted]; None: not shared

    @classmethod
    def of(cls, tracker: RoundTracker, targets: dict[str, float] | None = None) -> PlotData:
        records = list(tracker.rounds)
        orgs = sorted({org for r in records for org in r.epsilon})
        return cls(
            rounds=tuple(r.round for r in records),
            accuracy=tuple(r.accuracy for r in records),
            macro_f1=tuple(r.macro_f1 for r in records),
            dp_enabled=tracker.dp_enabled,
            epsilon={org: tuple(r.epsilon.get(org) for r in records) for org in orgs},
            targets=tuple(sorted({value for value in (targets or {}).values() if value is not None})),
            label_names=tuple(tracker.label_names),
            confusion=tuple(tuple(row) for row in matrix) if (matrix := _last_confusion(records)) else None,
        )


def _last_confusion(records) -> list[list[int]] | None:
    return records[-1].confusion_matrix if records else None


def draw(run_dir: Path, data: PlotData) -> Path:
    """Accuracy / macro-F1 per round, and epsilon spent per organisation per round, into ``run_dir/progress.png``.

    Matplotlib's object API (no pyplot): no global figure state, so a background thread may draw.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    rounds = list(data.rounds)
    left.plot(rounds, list(data.accuracy), marker="o", label="accuracy")
    if any(value is not None for value in data.macro_f1):
        left.plot(rounds, [math.nan if v is None else v for v in data.macro_f1], marker="s", label="macro-F1")
    else:  # an organisation does not send its per-class counts (privacy.share_per_class_eval: false)
        left.plot([], [], marker="s", label="macro-F1: not shared by the organisations")
    left.set(xlabel="round", ylabel="score", title="Global model on the organisations' test data", ylim=(0, 1))
    left.set_xticks(rounds)
    left.grid(alpha=0.3)
    left.legend()
    if data.dp_enabled:
        for org, spent in data.epsilon.items():
            right.plot(rounds, list(spent), marker="o", label=org)
        for value in data.targets:
            right.axhline(value, linestyle="--", color="grey", linewidth=1)
        right.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per organisation (dashed: target)")
        right.set_xticks(rounds)
        right.set_ylim(bottom=0)
        if data.epsilon:
            right.legend(fontsize="small")
    else:
        right.text(0.5, 0.5, "DP OFF\nno privacy guarantee", ha="center", va="center", fontsize=16)
        right.set_axis_off()
    right.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    _save(fig, path)
    if data.confusion is not None:
        draw_confusion(run_dir / CONFUSION_FILE, data.label_names, data.confusion, data.rounds[-1])
    return path


def _save(fig, path: Path) -> None:
    with atomic_files.replacing(path) as tmp:  # whole or not at all; a full disk is one line naming the file
        fig.savefig(tmp, dpi=110, format="png")


def draw_confusion(path: Path, labels: tuple[str, ...], matrix: tuple[tuple[int, ...], ...], rnd: int) -> Path:
    """Counts (rows: true class, columns: predicted), shaded by each row's share: a small class's errors show."""
    from matplotlib.figure import Figure

    size = max(4.0, 0.6 * len(labels) + 2.5)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.subplots()
    shares = [[cell / max(sum(row), 1) for cell in row] for row in matrix]
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for t, row in enumerate(matrix):
        for p, cell in enumerate(row):
            ax.text(p, t, str(cell), ha="center", va="center", color="white" if shares[t][p] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted class", ylabel="true class", title=f"Confusion matrix after round {rnd} (test data)")
    fig.colorbar(image, ax=ax, label="share of the true class")
    fig.tight_layout()
    _save(fig, path)
    return path


class ProgressPlots:
    """Draws ``progress.png`` in a background thread; ``submit`` at a round's end, ``close`` at the run's end."""

    def __init__(
        self,
        run_dir: Path,
        say: Callable[[str], None] = print,
        drawer: Callable[[Path, PlotData], object] = draw,
    ) -> None:
        self.run_dir, self.say, self.drawer = run_dir, say, drawer
        self.drawn = 0  # plots written (for tests and the curious)
        self._pending: PlotData | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._draw_loop, name="fedpriv-progress-plot", daemon=True)
        self._thread.start()

    def submit(self, tracker: RoundTracker, targets: dict[str, float] | None = None) -> None:
        """The plot of the rounds so far, to be drawn soon; returns at once."""
        data = PlotData.of(tracker, targets)
        with self._changed:
            if self._closed:
                raise RuntimeError("ProgressPlots: submit after close")
            self._pending = data
            self._changed.notify_all()

    def close(self) -> None:
        """Draw what is pending, then stop the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def _draw_loop(self) -> None:
        if self.drawer is draw:
            try:
                import matplotlib.figure  # noqa: F401 - imported here, while round 1 runs, not after it
            except Exception:  # noqa: BLE001 - the first draw says what is wrong
                pass
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None or self._closed)
                data, self._pending = self._pending, None
            if data is None:
                return
            try:
                self.drawer(self.run_dir, data)
                self.drawn += 1
            except Exception as exc:  # noqa: BLE001 - a plot is for people: the run goes on without it
                self.say(f"warning: {PLOT_FILE} not drawn after round {data.rounds[-1] if data.rounds else 0}: {exc}")
