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
and global model; ``training`` while the round runs, ``done`` once the reply is
stored, with its metrics and the ledger length before training) and
``train-reply.safetensors`` (the update). Written before the reply leaves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from client.node import NodeSetupError

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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


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
    meta = _read_meta(Path(folder))
    if meta is None or meta.get("run") != attempt.run or int(meta.get("round", 0)) < attempt.round:
        return None  # a new round (or another run): train
    trained_round, digest = int(meta["round"]), str(meta.get("global_digest", ""))
    if trained_round == attempt.round and digest == attempt.global_digest:
        if meta.get("status") == "done" and (Path(folder) / ARRAYS_FILE).exists():
            return StoredReply(
                tensors=load_file(str(Path(folder) / ARRAYS_FILE)),
                metrics=dict(meta["metrics"]),
                clipping_mode=meta.get("clipping_mode"),
            )
        if ledger_length <= int(meta.get("ledger_length", -1)):
            return None  # it stopped before recording any step: nothing was spent, train
        raise NodeSetupError(
            f"organisation '{org}': round {attempt.round} was trained and recorded in its ledger but the update"
            " was not stored (the node stopped, or its update was not finite); it is not trained again, which"
            " would spend privacy twice: this organisation sits this round out"
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


def finish(
    folder: Path,
    attempt: TrainAttempt,
    ledger_length: int,
    tensors: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    clipping_mode: str | None,
) -> None:
    """Store the reply (after its ledger entry, before it is sent): update first, then the metadata naming it."""
    path = Path(folder) / ARRAYS_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: tensor.detach().contiguous() for name, tensor in tensors.items()}, str(tmp))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    _write_json(
        Path(folder) / META_FILE,
        {
            "status": "done",
            **attempt.__dict__,
            "ledger_length": ledger_length,
            "metrics": metrics,
            "clipping_mode": clipping_mode,
        },
    )
