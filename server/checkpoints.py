"""Save the global trainable weights after every round (safetensors, one file per round)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round:04d}.safetensors"


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord) -> Path:
    """Write this round's weights (old rounds are pruned by ``server.resume.prune_checkpoints``, after the resume
    point that names this one is written)."""
    path = checkpoint_path(run_dir, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {name: tensor.contiguous() for name, tensor in arrays.to_torch_state_dict().items()}
    save_file(state, str(tmp), metadata={"round": str(server_round)})
    tmp.replace(path)
    return path


def load_checkpoint(path: Path) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=load_file(str(path)))
