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
from typing import Any

import torch

from fedpriv.privacy.redaction import PLACEHOLDERS
from fedpriv.shared_models.sources import MEAN_POOLED_MODEL_TYPE
from fedpriv.shared_models.weights import unwrap


def export_model(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    redaction: dict[str, dict] | None = None,
    *,
    max_length: int | None = None,
    summary: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``merged/`` (plain transformers model + tokenizer), for LoRA ``adapter/``, the card and the rules.

    ``merged/`` loads with ``AutoModelForSequenceClassification.from_pretrained``
    and needs neither peft nor fedpriv (a mean-pooled model carries its own class file and needs
    ``trust_remote_code=True``). ``redaction`` is each organisation's report (summary.json's ``redaction``;
    taken from ``summary`` when not given). ``max_length``: the tokens per text the model was trained on, kept in
    ``fedpriv-model.json`` so that prediction cuts texts the same way. ``summary``: the run's summary.json so
    far, from which the card names the accuracy, the privacy spent and the redaction rules.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if redaction is None and summary is not None:
        redaction = summary.get("redaction")
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
    info = {"format": MODEL_INFO_FORMAT, "max_length": max_length, "labels": labels, "mean_pooled": mean_pooled}
    (out / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    paths["info"] = str(out / MODEL_INFO_FILE)
    card = model_card(labels, rules, mean_pooled=mean_pooled, max_length=max_length, summary=summary)
    (out / "README.md").write_text(card, encoding="utf-8")
    paths["card"] = str(out / "README.md")
    return paths


# what prediction needs to know about the training beside the model: the tokens each text was cut to
MODEL_INFO_FILE = "fedpriv-model.json"
MODEL_INFO_FORMAT = "fedpriv-model/1"
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


def load_snippet(*, mean_pooled: bool, max_length: int | None, example: str) -> str:
    """The card's Python block: load ``merged/`` from the model folder and classify a text (tests run it as is)."""
    remote = ", trust_remote_code=True" if mean_pooled else ""
    cut = f", max_length={max_length}" if max_length else ""
    return "\n".join(
        [
            "import torch",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            # the tokenizer too: it reads merged/config.json, whose auto_map names the class file, and without
            # trust_remote_code transformers stops to ask whether to run it
            f'tokenizer = AutoTokenizer.from_pretrained("merged"{remote})',
            f'model = AutoModelForSequenceClassification.from_pretrained("merged"{remote}).eval()',
            f"texts = [{example!r}]  # redacted first where the section below says so",
            f'batch = tokenizer(texts, truncation=True{cut}, padding=True, return_tensors="pt")',
            "with torch.no_grad():",
            "    predicted = model(**batch).logits.argmax(dim=-1).tolist()",
            "print([model.config.id2label[i] for i in predicted])",
        ]
    )


def _results_lines(summary: dict[str, Any] | None) -> list[str]:
    """The card's "Results" and "Privacy spent" sections, from the run's summary.json."""
    if summary is None:
        return ["## Results", "", "See the run's `summary.json`.", ""]
    final = summary.get("final") or {}
    rounds, planned = len(summary.get("rounds") or []), (summary.get("config") or {}).get("training", {}).get("rounds")
    lines = ["## Results", ""]
    if final.get("accuracy") is None:
        lines.append("The global model was not evaluated in the last round (see the run's `summary.json`).")
    else:
        f1 = final.get("macro_f1")
        f1_text = "macro-F1 not shared by the organisations" if f1 is None else f"macro-F1 {f1:.3f}"
        lines.append(
            f"Accuracy {final['accuracy']:.3f}, {f1_text}, on the organisations' own test data after round"
            f" {final.get('round', rounds)} of {planned or rounds} (run status: {summary.get('status')}; per-class"
            " scores and the confusion matrix, where shared, in `summary.json`)."
        )
    lines += ["", "## Privacy spent", ""]
    if not summary.get("dp_enabled"):
        lines.append("DP was OFF in this run: the model carries no differential privacy guarantee.")
    else:
        lines.append(
            "Each organisation's epsilon at its delta after the last round it trained (DP-SGD, its own accountant):"
        )
        lines.append("")
        for org, report in sorted((summary.get("privacy") or {}).items()):
            if report.get("epsilon") is None:
                lines.append(f"- {org}: not reported")
            else:
                target = report.get("target_epsilon")
                lines.append(
                    f"- {org}: epsilon {report['epsilon']:.3f} at delta {report.get('delta'):g}"
                    + (f" (target {target:g})" if target is not None else "")
                )
    client_dp = summary.get("client_dp")
    if client_dp and client_dp.get("epsilon") is not None:
        lines += [
            "",
            f"Organisation-level DP: epsilon {client_dp['epsilon']:.3f} at delta {client_dp['delta']:g}"
            f" (it protects {client_dp.get('protects')}).",
        ]
    if summary.get("dp_enabled") or client_dp:
        lines += ["", "The signed ledgers (the run's `ledgers/`) let `fedpriv audit` recompute these."]
    return [*lines, ""]


def model_card(
    labels: list[str],
    rules: dict,
    *,
    mean_pooled: bool = False,
    max_length: int | None = None,
    summary: dict[str, Any] | None = None,
) -> str:
    """The exported model's README: what it predicts, how well, at what privacy cost, how to load it, and the
    redaction to apply first."""
    prediction = rules["prediction"]
    dp = summary is None or bool(summary.get("dp_enabled"))
    remote = (
        "`trust_remote_code=True` is needed: the head reads the mean of the token states (the class is"
        " `merged/mean_pooling.py`, torch and transformers only); without it transformers refuses the model type"
        " rather than load it as a [CLS] classifier."
        if mean_pooled
        else "A standard transformers classifier: no remote code."
    )
    cut = (
        f"Texts were cut to {max_length} tokens in training (`{MODEL_INFO_FILE}`'s `max_length`): cut new text the"
        " same way."
        if max_length
        else "The tokens per text used in training were not recorded."
    )
    lines = [
        "# fedpriv federated text classifier",
        "",
        "Trained with federated learning: each organisation fine-tuned it on its own text"
        + (" with DP-SGD." if dp else " WITHOUT differential privacy (DP was off)."),
        "",
        f"Labels: {', '.join(f'`{label}`' for label in labels)}.",
        "",
        *_results_lines(summary),
        "## Load it",
        "",
        "From this folder, with torch and transformers only (neither fedpriv nor peft):",
        "",
        "```python",
        load_snippet(mean_pooled=mean_pooled, max_length=max_length, example="an example text"),
        "```",
        "",
        f"{remote} {cut}",
        "",
        "- `merged/`: the model and its tokenizer.",
        "- `adapter/` (LoRA only): the adapter for `peft`.",
        f"- `{REDACTION_FILE}`: the redaction rules below, as data.",
        f"- `{MODEL_INFO_FILE}`: the labels and the tokens per text of training.",
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
            "`fedpriv.privacy.redaction.redactor_for(RedactionConfig(**rules['prediction'])).redact_one(text)`.",
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
