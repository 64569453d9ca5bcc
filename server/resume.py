"""The coordinator's resume point: what a restarted coordinator needs to continue a run after its last round.

After every complete round the coordinator writes, in this order, the round's
checkpoint, ``summary.json``, the strategy's own state (FedAdam's moments,
adaptive clipping's norm) and last ``checkpoints/resume.json``, the commit
point: it names the round, the checkpoint and the strategy state, and holds
the resolved config and what the round tracker and budget gate had gathered.
Older checkpoints are pruned only after it is written, so whatever instant the
coordinator dies at, the resume point it left names files that exist.

A resumed run starts from ``resume.json``'s round: the rounds before it are
never run again, the round the coordinator lost is run again (nodes that had
already trained it send their stored reply, see ``client/replay.py``), and the
config is the stored one (every node's noise was calibrated for the planned
rounds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.kernel import atomic_files
from fedpriv.kernel.errors import UserError

RESUME_FILE = "resume.json"
SUMMARY_FILE = (
    "summary.json"  # fedpriv.server.reports.SUMMARY_FILE (not imported: this module stays free of matplotlib)
)
ENDED = ("completed", "incomplete", "budget_exhausted")  # summary statuses of a run that finished
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "fedpriv-resume/1"
# strategy attributes that carry state from round to round (Flower's FedAdam: moments; DP adaptive clipping: norm).
# FedOpt's ``current_arrays``/``current_weights`` are rebuilt from the global weights the resumed run starts from.
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "clipping_norm")


class ResumeError(UserError):
    """A run folder that cannot be resumed (no resume point, damaged files, nothing left to run)."""


@dataclass(frozen=True)
class ResumePoint:
    """What ``checkpoints/resume.json`` holds: the last complete round and the state after it."""

    run_dir: Path
    round: int  # the last complete round (0: none yet; the run restarts from the initial model)
    config: dict[str, Any]
    rounds: list[dict[str, Any]]  # RoundTracker records, one per complete round
    privacy: dict[str, dict[str, Any]]  # RoundTracker's latest privacy report per organisation
    rejected_updates: list[dict[str, Any]]
    refusals: list[dict[str, Any]]
    elapsed_s: float
    checkpoint: str | None  # file name under checkpoints/ (None at round 0)
    strategy_state: str | None  # file name under checkpoints/ (None when the strategy keeps no state)
    resumes: list[int] = field(default_factory=list)  # rounds after which the run was resumed before
    redaction: dict[str, dict[str, Any]] = field(default_factory=dict)  # RoundTracker's redaction reports

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint is None else self.run_dir / CHECKPOINTS_DIR / self.checkpoint

    @property
    def strategy_state_path(self) -> Path | None:
        return None if self.strategy_state is None else self.run_dir / CHECKPOINTS_DIR / self.strategy_state

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "round": self.round,
            "checkpoint": self.checkpoint,
            "strategy_state": self.strategy_state,
            "elapsed_s": self.elapsed_s,
            "config": self.config,
            "rounds": self.rounds,
            "privacy": self.privacy,
            "rejected_updates": self.rejected_updates,
            "refusals": self.refusals,
            "resumes": self.resumes,
            "redaction": self.redaction,
        }


def resume_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / RESUME_FILE


def strategy_state_name(server_round: int) -> str:
    return f"strategy-{server_round:04d}.npz"


def write_resume_point(point: ResumePoint) -> Path:
    """Write ``resume.json`` atomically (fsynced): from now on a restart continues after ``point.round``."""
    return atomic_files.write_text(resume_path(point.run_dir), json.dumps(point.to_dict(), indent=1))


def prune_checkpoints(run_dir: Path, point: ResumePoint, keep_last: int) -> None:
    """Delete checkpoints beyond the newest ``keep_last`` (0 keeps all) and every stale strategy state.

    The files ``point`` names are never deleted, whatever ``keep_last`` says.
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    keep = {point.checkpoint, point.strategy_state}
    if keep_last > 0:
        for old in sorted(folder.glob("round-*.safetensors"))[:-keep_last]:
            if old.name not in keep:
                old.unlink()
    for old in folder.glob("strategy-*.npz"):
        if old.name not in keep:
            old.unlink()


def load_resume_point(run_dir: str | Path) -> ResumePoint:
    """The run's resume point, checked: every file it names exists. One-line ResumeError otherwise."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise ResumeError(f"--resume {run_dir}: no such run folder")
    path = resume_path(run_dir)
    if not path.exists():
        raise ResumeError(
            f"--resume {run_dir}: no {CHECKPOINTS_DIR}/{RESUME_FILE} (not a fedpriv run folder, or one written"
            " before runs could be resumed)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path}: not a readable resume point ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ResumeError(f"{path}: format {found!r}, expected {FORMAT!r}")
    try:
        point = ResumePoint(
            run_dir=run_dir,
            round=int(raw["round"]),
            config=dict(raw["config"]),
            rounds=[dict(r) for r in raw["rounds"]],
            privacy={str(k): dict(v) for k, v in raw["privacy"].items()},
            rejected_updates=[dict(r) for r in raw["rejected_updates"]],
            refusals=[dict(r) for r in raw["refusals"]],
            elapsed_s=float(raw["elapsed_s"]),
            checkpoint=raw["checkpoint"],
            strategy_state=raw["strategy_state"],
            resumes=[int(r) for r in raw["resumes"]],
            redaction={str(k): dict(v) for k, v in raw.get("redaction", {}).items()},  # absent before issue 7
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ResumeError(f"{path}: damaged resume point ({type(exc).__name__}: {exc})") from None
    if len(point.rounds) != point.round:
        raise ResumeError(f"{path}: names round {point.round} but holds {len(point.rounds)} round record(s)")
    for label, file in (("checkpoint", point.checkpoint_path), ("strategy state", point.strategy_state_path)):
        if file is not None and not file.is_file():
            raise ResumeError(f"{path}: its {label} {file} is missing; the run cannot be resumed from it")
    if point.round > 0 and point.checkpoint is None:
        raise ResumeError(f"{path}: round {point.round} without a checkpoint")
    return point


def resumable(point: ResumePoint) -> ResumePoint:
    """``point`` if its run stopped before its end; a run that ended (its summary says how) has nothing to resume."""
    summary = point.run_dir / SUMMARY_FILE
    status, stopped_by_error = None, False
    if summary.exists():
        try:
            written = json.loads(summary.read_text(encoding="utf-8"))
            status = written.get("status")
            # a run a full disk (or another one-line error) stopped half-way: ``incomplete`` with its ``error``
            stopped_by_error = status == "incomplete" and bool(written.get("error"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            status = None  # a summary cut mid-write: the resume point decides
    if status in ENDED and not stopped_by_error:
        raise ResumeError(
            f"--resume {point.run_dir}: the run already ended (summary.json status {status!r} after"
            f" {len(point.rounds)} round(s)); nothing to resume. Start a new run instead"
        )
    return point


# -- strategy state ------------------------------------------------------------------------------------------


def strategy_layers(strategy) -> list:
    """The strategy and every strategy it wraps (``inner``: our budget gate; ``strategy``: Flower's DP wrappers)."""
    layers = []
    while strategy is not None and all(strategy is not seen for seen in layers):
        layers.append(strategy)
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return layers


def capture_strategy_state(strategy) -> dict[str, np.ndarray]:
    """The round-to-round state of ``strategy``'s layers as flat named arrays (empty when it keeps none).

    Keys: ``L<layer>/<attribute>`` for a number, ``L<layer>/<attribute>/<name>`` for a dict of arrays (the
    Message-API strategies), ``L<layer>/<attribute>/#<index>`` for a list of arrays (the legacy ones).
    """
    flat: dict[str, np.ndarray] = {}
    for index, layer in enumerate(strategy_layers(strategy)):
        for attribute in STATEFUL_ATTRIBUTES:
            value = getattr(layer, attribute, None)
            key = f"L{index}/{attribute}"
            if value is None or (isinstance(value, dict | list) and not value):
                continue
            if isinstance(value, dict):
                flat.update({f"{key}/{name}": np.asarray(array) for name, array in value.items()})
            elif isinstance(value, list):
                flat.update({f"{key}/#{i}": np.asarray(array) for i, array in enumerate(value)})
            else:
                flat[key] = np.asarray(float(value))
    return flat


def save_strategy_state(run_dir: Path, server_round: int, strategy) -> str | None:
    """Write the state after ``server_round`` (checkpoints/strategy-NNNN.npz); None when there is none."""
    flat = capture_strategy_state(strategy)
    if not flat:
        return None
    name = strategy_state_name(server_round)
    with atomic_files.replacing(Path(run_dir) / CHECKPOINTS_DIR / name) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **flat)
    return name


def restore_strategy_state(strategy, path: Path) -> list[str]:
    """Put the saved state back into ``strategy``'s layers; returns the attributes restored.

    A saved attribute the strategy does not have means another strategy made the file: refused.
    """
    with np.load(path, allow_pickle=False) as saved:
        flat = {key: saved[key] for key in saved.files}
    layers = strategy_layers(strategy)
    grouped: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, array in flat.items():
        layer, attribute, *rest = key.split("/", 2)
        index = int(layer[1:])
        if index >= len(layers) or attribute not in STATEFUL_ATTRIBUTES or not hasattr(layers[index], attribute):
            raise ResumeError(f"{path}: holds {key}, which this run's strategy does not keep")
        grouped.setdefault((index, attribute), {})[rest[0] if rest else ""] = array
    restored = []
    for (index, attribute), parts in sorted(grouped.items()):
        if list(parts) == [""]:
            value: Any = float(parts[""])
        elif all(name.startswith("#") for name in parts):
            value = [parts[f"#{i}"] for i in range(len(parts))]
        else:
            value = dict(parts)
        setattr(layers[index], attribute, value)
        restored.append(f"{type(layers[index]).__name__}.{attribute}")
    return restored
