"""The exported model names its redaction rules, and prediction applies them (or says why it cannot)."""

from __future__ import annotations

import json

import pytest
import torch

from fedpriv.kernel.config import ModelConfig
from fedpriv.kernel.errors import ConfigError
from fedpriv.shared_models.builder import build_model, build_tokenizer
from fedpriv.shared_models.export import export_model, prediction_rules
from fedpriv.shared_models.predict import Predictor

LABELS = ["neg", "pos"]
ON = {"enabled": True, "rules": "fedpriv-pii", "version": "1", "kinds": ["email", "person"], "locales": ["uk"],
      "min_score": 0.5, "extra_names": True, "digest": "ab" * 32, "counts": {"email": 2, "person": 5}}  # fmt: skip


def test_prediction_applies_the_union_of_the_organisations_rules_and_never_their_names_files():
    other = {**ON, "kinds": ["phone"], "locales": ["us"], "min_score": 0.4, "extra_names": False}
    rules = prediction_rules({"b": other, "a": ON, "c": {"enabled": False}})
    assert rules["prediction"] == {
        "enabled": True, "rules": "fedpriv-pii", "kinds": ["email", "person", "phone"], "locales": ["uk", "us"],
        "min_score": 0.4, "extra_names": None,
    }  # fmt: skip
    assert list(rules["organisations"]) == ["a", "b", "c"] and "counts" not in rules["organisations"]["a"]
    assert prediction_rules({"a": {"enabled": False}})["prediction"] == {"enabled": False}
    assert prediction_rules({})["prediction"] == {"enabled": False}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export") / "model"
    export_model(
        build_model(ModelConfig(name="tiny", finetuning="full"), LABELS), build_tokenizer("tiny"), out, {"a": ON}
    )
    return out


def test_the_card_and_the_rules_file_say_what_prediction_must_apply(exported):
    card = (exported / "README.md").read_text()
    assert "`fedpriv-pii`" in card and "`[EMAIL]`, `[PERSON]`" in card and "fedpriv predict" in card
    assert "- a: `fedpriv-pii` v1" in card and "own names list: yes" in card
    assert json.loads((exported / "redaction.json").read_text())["prediction"]["kinds"] == ["email", "person"]


def test_predict_redacts_with_the_recorded_rules_before_the_model_sees_the_text(exported):
    predictor = Predictor(exported)
    (one,) = predictor.predict(["Harriet Pemberton wrote from jo@example.org at 020 7946 0374."])
    assert one.text == "[PERSON] wrote from [EMAIL] at 020 7946 0374."  # phone was no organisation's rule
    assert one.redacted == {"email": 1, "person": 1} and one.label in LABELS and 0 < one.score <= 1


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / "redaction.json").unlink(), "redaction.json: not found"),
        (lambda d: (d / "redaction.json").write_text("{not json"), "not readable JSON"),
        (lambda d: (d / "redaction.json").write_text('{"format": "other"}'), "expected format 'fedpriv-redaction/1'"),
        (
            lambda d: (d / "redaction.json").write_text(
                json.dumps({"format": "fedpriv-redaction/1", "prediction": {"enabled": True, "kinds": ["dna"]}})
            ),
            "prediction: kinds: expected a non-empty list of distinct kinds",
        ),
        (lambda d: (d / "merged" / "config.json").unlink(), "no merged/config.json"),
    ],
    ids=["missing", "not-json", "other-format", "unknown-kind", "no-model"],
)
def test_a_damaged_model_folder_is_one_line_naming_the_file(exported, tmp_path, damage, expected):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    damage(folder)
    with pytest.raises(ConfigError) as caught:
        Predictor(folder)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_predict_cuts_texts_at_the_length_the_model_was_trained_with(tiny_dp_run, capsys):
    from fedpriv.cli import main

    model_dir = tiny_dp_run[1] / "model"
    assert json.loads((model_dir / "fedpriv-model.json").read_text())["max_length"] == 64  # data.max_length=64
    assert Predictor(model_dir).max_length == 64
    assert Predictor(model_dir, max_length=16).max_length == 16  # an explicit length still wins
    long_text = " ".join(["markets"] * 300)
    assert main(["predict", str(model_dir), long_text]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in {"business", "entertainment", "politics", "sports", "tech"}
    assert main(["predict", "--max-length", "0", str(model_dir), "x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-length 0: expected an integer >= 1 (tokens kept per text)"


def test_an_export_without_the_recorded_length_falls_back_to_128(exported, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(exported, folder)
    (folder / "fedpriv-model.json").unlink(missing_ok=True)
    assert Predictor(folder).max_length == 128
    (folder / "fedpriv-model.json").write_text('{"format": "fedpriv-model/1", "max_length": "long"}')
    with pytest.raises(ConfigError, match="fedpriv-model.json: expected format 'fedpriv-model/1' with max_length"):
        Predictor(folder)
