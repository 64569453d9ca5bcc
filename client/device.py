"""Pick the torch device for local training: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch

from fedpriv.kernel.errors import ConfigError


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"training.device: '{setting}' requested but no CUDA device is available")
        index = int(setting.split(":", 1)[1]) if ":" in setting else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"training.device: '{setting}': only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(setting)
