"""A node's last train reply, kept so that a round the coordinator lost is answered again, never trained again.

When the coordinator dies mid-round and resumes from its last complete round,
it asks again for the round it lost. A node that had already trained that
round on the same global model sends the reply it stored: re-sending the same
DP output is post-processing, so no privacy is spent and no ledger entry is
added, and the run's epsilon is that of an uninterrupted run. Training the
round again would be a second release for the same round, so every other
repeat is refused with a reason: a different global model for a round already
trained, or a round whose reply was lost after its privacy was recorded.

Two files in the node's state folder: ``train-reply.json`` (which run, round
and global model, the ledger's length before training; ``training`` while the
round runs, ``stored`` once the update and its metrics are written, which is
before the round's ledger entry, ``done`` after it) and
``train-reply.safetensors`` (the update). A stored reply whose ledger entry
was never written is never sent: the round is trained again (nothing was
recorded, and nothing had left the node).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fedpriv.client.node import NodeSetupError
from fedpriv.kernel import atomic_files

META_FILE = "train-reply.json"
ARRAYS_FILE = "train-reply.safetensors"


@dataclass(frozen=True)
class TrainAttempt:
    """Which train message this is: the coordinator's run, the round and the global model it carried."""

    run: str
    round: int
    global_digest: str


@dataclass(frozen=True)
class StoredReply:
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    clipping_mode: str | None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_files.write_text(path, json.dumps(data))


def _read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # cut mid-write: the ledger, not this file, is what records spending


def previous_reply(folder: Path, attempt: TrainAttempt, ledger_length: int, org: str) -> StoredReply | None:
    """The stored reply when ``attempt`` repeats the round it answered; None when the node should train.

    Raises NodeSetupError (the node leaves this round out; its ledger already holds the spending) when the
    round was trained before and cannot be answered with the same reply.
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None or meta.get("run") != attempt.run or int(meta.get("round", 0)) < attempt.round:
        return None  # a new round (or another run): train
    trained_round, digest = int(meta["round"]), str(meta.get("global_digest", ""))
    if trained_round == attempt.round and digest == attempt.global_digest:
        recorded = ledger_length > int(meta.get("ledger_length", -1))  # its ledger entry was written
        status = meta.get("status")
        if status in ("stored", "done") and (folder / ARRAYS_FILE).exists() and (status == "done" or recorded):
            if status == "stored":
                mark_done(folder)  # the node had stopped between its ledger entry and this mark
            return StoredReply(
                tensors=load_file(str(folder / ARRAYS_FILE)),
                metrics=dict(meta["metrics"]),
                clipping_mode=meta.get("clipping_mode"),
            )
        if not recorded:
            return None  # stopped before its ledger entry: nothing recorded, nothing left the node: train
        raise NodeSetupError(
            f"organisation '{org}': round {attempt.round} was trained and recorded in its ledger but its update"
            " was not stored (it was not finite); it is not trained again, which would spend privacy twice: this"
            " organisation sits this round out"
        )
    raise NodeSetupError(
        f"organisation '{org}': already trained round {trained_round} of this run (on global model"
        f" {digest[:12]}); refusing to train round {attempt.round} on global model {attempt.global_digest[:12]}:"
        " a second update for a round already released would spend privacy twice (resume the coordinator from"
        " its last complete round)"
    )


def begin(folder: Path, attempt: TrainAttempt, ledger_length: int) -> None:
    """Mark the round as being trained (before any DP step), with the ledger's length at that moment."""
    _write_json(
        Path(folder) / META_FILE,
        {"status": "training", **attempt.__dict__, "ledger_length": ledger_length},
    )


def store(
    folder: Path,
    attempt: TrainAttempt,
    ledger_length: int,
    tensors: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    clipping_mode: str | None,
) -> None:
    """Store the reply BEFORE its ledger entry (status ``stored``): the update first, then the metadata naming it.

    Until the ledger entry exists the stored reply is never sent (``previous_reply`` checks the ledger's length).
    """
    update = save({name: tensor.detach().contiguous() for name, tensor in tensors.items()})
    atomic_files.write_bytes(Path(folder) / ARRAYS_FILE, update, 0o600)  # a full disk: DiskError naming it
    _write_json(
        Path(folder) / META_FILE,
        {
            "status": "stored",
            **attempt.__dict__,
            "ledger_length": ledger_length,
            "metrics": metrics,
            "clipping_mode": clipping_mode,
        },
    )


def mark_done(folder: Path) -> None:
    """After the ledger entry: the stored reply is the round's released update."""
    meta = _read_meta(Path(folder)) or {}
    _write_json(Path(folder) / META_FILE, {**meta, "status": "done"})
