"""Save the global trainable weights after every round (safetensors, one file per round)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord
from safetensors.torch import load_file, save

from fedpriv.kernel import atomic_files


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round:04d}.safetensors"


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord) -> Path:
    """Write this round's weights (old rounds are pruned by ``fedpriv.server.resume.prune_checkpoints``, after the resume
    point that names this one is written)."""
    path = checkpoint_path(run_dir, server_round)
    state = {name: tensor.contiguous() for name, tensor in arrays.to_torch_state_dict().items()}
    # serialised in memory, then written by our own atomic write: a full disk is an OSError naming the file
    return atomic_files.write_bytes(path, save(state, metadata={"round": str(server_round)}))


def load_checkpoint(path: Path) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=load_file(str(path)))
