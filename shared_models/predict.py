"""Predict with an exported model, applying the redaction rules it was trained under first.

The exported folder (``shared_models/export.py``) holds the merged model,
its tokenizer and ``redaction.json``; text is redacted with those rules
before tokenisation, exactly as the organisations' nodes did in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpriv.kernel.config import RedactionConfig, redaction_from_dict
from fedpriv.kernel.errors import ConfigError
from fedpriv.privacy.redaction import Redactor, redactor_for
from fedpriv.shared_models.export import MODEL_INFO_FILE, MODEL_INFO_FORMAT, REDACTION_FILE, REDACTION_FORMAT

# an export from before fedpriv-model.json recorded the training max_length
FALLBACK_MAX_LENGTH = 128


@dataclass
class Prediction:
    label: str
    score: float  # the softmax probability of ``label``
    text: str  # the text the model saw (redacted)
    redacted: dict[str, int]  # matches replaced per kind


def read_prediction_rules(model_dir: Path) -> RedactionConfig:
    """The rules ``redaction.json`` says prediction applies; one clear line when it is missing or damaged."""
    path = model_dir / REDACTION_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found; expected the {REDACTION_FILE} that fedpriv exports with the model"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc.__class__.__name__})") from None
    if (
        not isinstance(raw, dict)
        or raw.get("format") != REDACTION_FORMAT
        or not isinstance(raw.get("prediction"), dict)
    ):
        raise ConfigError(f"{path}: expected format {REDACTION_FORMAT!r} with a 'prediction' mapping")
    return redaction_from_dict(raw["prediction"], f"{path}: prediction")


def read_training_max_length(model_dir: Path) -> int | None:
    """The tokens per text the model was trained on (``fedpriv-model.json``); None for an export without it."""
    path = model_dir / MODEL_INFO_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc.__class__.__name__})") from None
    value = raw.get("max_length") if isinstance(raw, dict) and raw.get("format") == MODEL_INFO_FORMAT else False
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: expected format {MODEL_INFO_FORMAT!r} with max_length a positive integer or null")
    return value


class Predictor:
    """An exported model, its tokenizer and its redaction rules, loaded once."""

    def __init__(self, model_dir: str | Path, max_length: int | None = None):
        """``max_length``: tokens kept per text; None: what the model was trained with (else 128)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        import fedpriv.shared_models.mean_pooling  # noqa: F401  (registers fedpriv's mean-pooled classifier: no remote code)

        model_dir = Path(model_dir)
        merged = model_dir / "merged"
        if not (merged / "config.json").is_file():
            raise ConfigError(f"{model_dir}: no merged/config.json; expected a fedpriv run's model/ folder")
        self.rules = read_prediction_rules(model_dir)
        self.redactor: Redactor | None = redactor_for(self.rules)
        self.tokenizer = AutoTokenizer.from_pretrained(str(merged))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
        trained = read_training_max_length(model_dir)
        self.max_length = max_length or trained or FALLBACK_MAX_LENGTH

    def predict(self, texts: list[str]) -> list[Prediction]:
        if self.redactor is not None:
            redacted = [self.redactor.redact([text]) for text in texts]
            seen, counts = [r.texts[0] for r in redacted], [r.counts for r in redacted]
        else:
            seen, counts = list(texts), [{} for _ in texts]
        encoded = self.tokenizer(seen, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            probabilities = torch.softmax(self.model(**encoded).logits, dim=-1)
        best = probabilities.argmax(dim=-1).tolist()
        labels = self.model.config.id2label
        return [
            Prediction(str(labels[index]), float(probabilities[row, index]), seen[row], counts[row])
            for row, index in enumerate(best)
        ]
