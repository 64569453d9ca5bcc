"""The mean-pooled classifier: which checkpoints get it, that padding never reaches the head, and its export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fedpriv.kernel.config import ModelConfig
from fedpriv.kernel.errors import ConfigError
from fedpriv.shared_models.builder import build_model, build_tokenizer
from fedpriv.shared_models.export import export_model
from fedpriv.shared_models.sources import minilm_dir, resolve_pooling

LABELS = ["neg", "pos"]


def _tiny_mean(finetuning="lora"):
    return build_model(ModelConfig(name="tiny", finetuning=finetuning, pooling="mean"), LABELS)


def _encoded(texts, tokenizer=None, padding=True):
    tokenizer = tokenizer or build_tokenizer("tiny")
    return tokenizer(texts, padding=padding, return_tensors="pt")


def test_auto_is_mean_for_all_minilm_and_cls_for_the_tiny_bert():
    assert resolve_pooling("minilm", "auto") == "mean"  # its sentence-transformers pooling is the token mean
    assert resolve_pooling("tiny", "auto") == "cls"
    assert resolve_pooling("minilm", "cls") == "cls"
    model = build_model(ModelConfig(name="minilm"), LABELS)
    assert type(model.base_model.model).__name__ == "MeanPooledBertForSequenceClassification"
    assert not any("pooler" in name for name, _ in model.named_parameters())  # no untrained pooler left over


def test_minilm_with_mean_pooling_keeps_every_pretrained_encoder_weight():
    from transformers import AutoModel

    model = build_model(ModelConfig(name="minilm", finetuning="full", pooling="mean"), LABELS).eval()
    reference = AutoModel.from_pretrained(str(minilm_dir())).eval()
    enc = _encoded(["a gripping , funny film", "dull"], build_tokenizer("minilm"))
    with torch.no_grad():
        ours = model.bert(**enc).last_hidden_state
        theirs = reference(**enc).last_hidden_state
    torch.testing.assert_close(ours, theirs)


def test_padding_does_not_change_the_logits():
    model = _tiny_mean().eval()
    tokenizer = build_tokenizer("tiny")
    short = _encoded(["a good day"], tokenizer)
    padded = tokenizer(["a good day"], padding="max_length", max_length=24, return_tensors="pt")
    assert padded["attention_mask"].sum() < 24  # really padded
    with torch.no_grad():
        torch.testing.assert_close(model(**short).logits, model(**padded).logits, rtol=1e-5, atol=1e-6)


def test_the_head_is_the_only_new_part_and_lora_trains_it():
    model = _tiny_mean("lora")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in name for name in trainable)
    assert any("lora_A" in name for name in trainable)
    assert not any("pooler" in name for name, _ in model.named_parameters())


def _bert_like_dir(path, model_type="bert", pooling=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")
    if pooling is not None:
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(pooling, encoding="utf-8")
    return str(path)


def test_pooling_that_does_not_fit_the_checkpoint_is_a_one_line_config_error(tmp_path):
    roberta = _bert_like_dir(tmp_path / "roberta", "roberta")
    assert resolve_pooling(roberta, "auto") == "cls"
    with pytest.raises(ConfigError, match=r"model.pooling: mean supports BERT-family checkpoints; .* is 'roberta'"):
        resolve_pooling(roberta, "mean")
    cls_sentence_model = _bert_like_dir(tmp_path / "cls-st", pooling='{"pooling_mode_cls_token": true}')
    assert resolve_pooling(cls_sentence_model, "auto") == "cls"
    damaged = _bert_like_dir(tmp_path / "damaged", pooling="{not json")
    with pytest.raises(ConfigError, match=r"1_Pooling/config.json: cannot read the sentence-transformers pooling"):
        resolve_pooling(damaged, "auto")
    with pytest.raises(ConfigError, match="model.pooling"):
        from fedpriv.kernel.config import load_config

        load_config(None, ["model.pooling=max"])


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_exported_mean_pooled_model_loads_the_same_in_and_out_of_fedpriv(tmp_path, finetuning):
    from transformers import AutoModelForSequenceClassification

    model = _tiny_mean(finetuning)
    with torch.no_grad():  # non-trivial trained weights, so that a wrong head or a lost adapter shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    paths = export_model(model, build_tokenizer("tiny"), tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text(encoding="utf-8")
    assert "trust_remote_code=True" in card
    texts = ["a good day", "terrible service , never again"]
    enc = _encoded(texts)
    model.eval()
    with torch.no_grad():
        expected = model(**enc).logits
        # In a fedpriv process the class is registered: no remote code runs.
        reloaded = AutoModelForSequenceClassification.from_pretrained(paths["merged"]).eval()
        torch.testing.assert_close(reloaded(**enc).logits, expected, rtol=1e-5, atol=1e-5)
        assert (reloaded.config.model_type, type(reloaded).__name__) == (
            "fedpriv_mean_pooled_bert", "MeanPooledBertForSequenceClassification"
        )  # fmt: skip
    # A plain transformers process: with trust_remote_code the shipped class file gives the same logits;
    # without it transformers refuses the model type (never a silent [CLS] model with a random pooler).
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "path = sys.argv[1]\n"
        "assert 'shared_models' not in sys.modules\n"
        "try:\n"
        "    AutoModelForSequenceClassification.from_pretrained(path)\n"
        "    refused = False\n"
        "except (ValueError, KeyError):\n"
        "    refused = True\n"
        "model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()\n"
        "enc = AutoTokenizer.from_pretrained(path)(json.loads(sys.argv[2]), padding=True, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    print('RESULT' + json.dumps({'refused': refused, 'logits': model(**enc).logits.tolist()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, paths["merged"], json.dumps(texts)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # transformers' refusal prompt ("Do you wish to run the custom code? [y/N]") shares the line
    results = [line.partition("RESULT")[2] for line in done.stdout.splitlines() if "RESULT" in line]
    assert results, done.stdout[-2000:] + done.stderr[-2000:]
    out = json.loads(results[-1])
    assert out["refused"] is True
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, rtol=1e-5, atol=1e-5)
