"""Export the final global model as a loadable Hugging Face directory (+ LoRA adapter), with its model card.

The card (``README.md``) and ``redaction.json`` say which redaction rules the
organisations applied to their text before training: prediction must apply
the same rules (``fedpriv predict`` does), or the model sees text unlike what
it learnt from.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from privacy.redaction import PLACEHOLDERS
from shared_models.sources import MEAN_POOLED_MODEL_TYPE
from shared_models.weights import unwrap


def export_model(
    model: torch.nn.Module, tokenizer, out_dir: str | Path, redaction: dict[str, dict] | None = None
) -> dict[str, str]:
    """Write ``merged/`` (plain transformers model + tokenizer), for LoRA ``adapter/``, the card and the rules.

    ``merged/`` loads with ``AutoModelForSequenceClassification.from_pretrained``
    and needs neither peft nor fedpriv (a mean-pooled model carries its own class file and needs
    ``trust_remote_code=True``). ``redaction`` is each organisation's report (summary.json's ``redaction``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(unwrap(model)).to("cpu").eval()
    paths: dict[str, str] = {}
    if hasattr(model, "merge_and_unload"):  # a peft model
        adapter_dir = out / "adapter"
        model.save_pretrained(str(adapter_dir))
        paths["adapter"] = str(adapter_dir)
        model = model.merge_and_unload()
    merged_dir = out / "merged"
    model.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
    paths["merged"] = str(merged_dir)
    rules = prediction_rules(redaction or {})
    (out / REDACTION_FILE).write_text(json.dumps(rules, indent=2) + "\n", encoding="utf-8")
    paths["redaction"] = str(out / REDACTION_FILE)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    mean_pooled = model.config.model_type == MEAN_POOLED_MODEL_TYPE
    (out / "README.md").write_text(model_card(labels, rules, mean_pooled=mean_pooled), encoding="utf-8")
    paths["card"] = str(out / "README.md")
    return paths


REDACTION_FILE = "redaction.json"
REDACTION_FORMAT = "fedpriv-redaction/1"


def prediction_rules(reports: dict[str, dict]) -> dict:
    """``redaction.json``: every organisation's rule set, and the rules prediction applies.

    Prediction applies every kind and locale any organisation redacted (the
    strictest union), at the lowest score threshold among them; an
    organisation's own names file stays with it (only its use is recorded). How many matches an organisation
    reported (``redaction.share: counts``) never goes into the exported model; which kinds it found does.
    """
    organisations = {org: {k: v for k, v in report.items() if k != "counts"} for org, report in sorted(reports.items())}
    on = [report for report in organisations.values() if report.get("enabled") is True]
    if on:
        names = sorted({str(report.get("rules")) for report in on})
        prediction = {
            "enabled": True,
            "rules": names[0] if len(names) == 1 else "union-" + "-".join(names)[:58],
            "kinds": sorted({kind for report in on for kind in report.get("kinds", [])}),
            "locales": sorted({loc for report in on for loc in report.get("locales", [])}),
            "min_score": min(float(report.get("min_score", 0.4)) for report in on),
            "extra_names": None,
        }
    else:
        prediction = {"enabled": False}
    return {"format": REDACTION_FORMAT, "prediction": prediction, "organisations": organisations}


def model_card(labels: list[str], rules: dict, *, mean_pooled: bool = False) -> str:
    """The exported model's README: what it predicts, how to load it, and the redaction to apply first."""
    prediction = rules["prediction"]
    merged = (
        '- `merged/`: `AutoModelForSequenceClassification.from_pretrained("merged", trust_remote_code=True)` with'
        " its tokenizer: the head reads the mean of the token states (the class is `merged/mean_pooling.py`, torch"
        " and transformers only; without `trust_remote_code` transformers refuses the model type rather than"
        " load it as a [CLS] classifier)."
        if mean_pooled
        else '- `merged/`: `AutoModelForSequenceClassification.from_pretrained("merged")` with its tokenizer.'
    )
    lines = [
        "# fedpriv federated text classifier",
        "",
        "Trained with federated learning: each organisation fine-tuned it on its own text with DP-SGD (see the",
        "run's `summary.json` and the organisations' ledgers for the privacy spent).",
        "",
        f"Labels: {', '.join(f'`{label}`' for label in labels)}.",
        "",
        merged,
        "- `adapter/` (LoRA only): the adapter for `peft`.",
        f"- `{REDACTION_FILE}`: the redaction rules below, as data.",
        "",
        "## Redaction: apply it before prediction",
        "",
    ]
    if prediction.get("enabled"):
        placeholders = ", ".join(f"`{PLACEHOLDERS[kind]}`" for kind in prediction["kinds"] if kind in PLACEHOLDERS)
        lines += [
            "The organisations replaced personal data in their text with typed placeholders before tokenisation, so",
            "the model learnt from redacted text. Apply the same rules to new text:",
            "",
            f"- rules `{prediction['rules']}`: kinds {', '.join(prediction['kinds'])}; locales"
            f" {', '.join(prediction['locales'])}; matches scoring at least {prediction['min_score']} replaced",
            f"- each match replaced by its kind's placeholder: {placeholders}",
            "",
            "`fedpriv predict MODEL_DIR TEXT...` loads this folder and applies them; in Python,",
            "`privacy.redaction.redactor_for(RedactionConfig(**rules['prediction'])).redact_one(text)`.",
            "",
            "Per organisation (as each node reported it):",
            "",
        ]
        for org, spec in rules["organisations"].items():
            if spec.get("enabled"):
                if "found" in spec:
                    found = f"found: {', '.join(spec['found']) or 'nothing'}"
                else:
                    found = "what was found: not shared by the organisation"
                lines.append(
                    f"- {org}: `{spec.get('rules')}` v{spec.get('version')} ({spec.get('engine')}), kinds"
                    f" {', '.join(spec.get('kinds', []))}, locales {', '.join(spec.get('locales', []))},"
                    f" own names list: {'yes' if spec.get('extra_names') else 'no'}, digest {str(spec.get('digest'))[:16]};"
                    f" {found}"
                )
            else:
                lines.append(f"- {org}: no redaction")
    else:
        lines.append("No organisation redacted its text: predict on text as it is.")
    return "\n".join(lines) + "\n"
