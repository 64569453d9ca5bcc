"""Move the trainable part of the shared model in and out of Flower ``ArrayRecord``s.

Only parameters with ``requires_grad`` travel (with LoRA: adapters + head),
so uploads stay small and frozen pretrained weights never leave a node.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord


class WeightMismatchError(ValueError):
    """Received weights do not fit the model's trainable parameters."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside Opacus wrappers (GradSampleModule keeps it in ``_module``)."""
    while hasattr(model, "_module") and isinstance(model._module, torch.nn.Module):
        model = model._module
    return model


def trainable_state(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached CPU copies of the trainable parameters, in a stable order."""
    return OrderedDict(
        (name, param.detach().to("cpu", copy=True))
        for name, param in unwrap(model).named_parameters()
        if param.requires_grad
    )


def trainable_arrays(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=trainable_state(model))


def load_trainable(model: torch.nn.Module, arrays: ArrayRecord | dict[str, torch.Tensor]) -> None:
    """Overwrite the trainable parameters; names and shapes must match exactly."""
    state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
    params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise WeightMismatchError(
            f"weights do not match the model's trainable parameters: {len(missing)} missing"
            f" (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(param.shape):
                raise WeightMismatchError(
                    f"weights: '{name}' has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def base_model_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the frozen parameters: parties must train on the same base model."""
    digest = hashlib.sha256()
    for name, param in sorted(unwrap(model).named_parameters()):
        if param.requires_grad:
            continue
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over named weights as received (names, shapes, dtypes, bytes): which global model a node trained."""
    digest = hashlib.sha256()
    for name in sorted(arrays.keys()):
        value = arrays[name].numpy()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
