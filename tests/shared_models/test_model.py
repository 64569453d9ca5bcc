"""The shared classifier: deterministic build, weight exchange through ArrayRecord, export."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from fedpriv.kernel.config import LoraConfig, ModelConfig
from fedpriv.kernel.errors import ConfigError
from fedpriv.shared_models.builder import build_model, build_tokenizer
from fedpriv.shared_models.export import export_model
from fedpriv.shared_models.weights import (
    WeightMismatchError,
    base_model_digest,
    load_trainable,
    trainable_arrays,
    trainable_state,
)

LABELS = ["neg", "neu", "pos"]


def _tiny(finetuning="lora", seed=0):
    return build_model(ModelConfig(name="tiny", finetuning=finetuning, init_seed=seed), LABELS)


def _batch():
    tok = build_tokenizer("tiny")
    enc = tok(["a good day", "terrible service, never again", "ok"], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_same_config_builds_identical_frozen_weights_everywhere():
    assert base_model_digest(_tiny()) == base_model_digest(_tiny())
    assert base_model_digest(_tiny(seed=0)) != base_model_digest(_tiny(seed=1))


def test_lora_only_trainable_tensors_travel():
    model = _tiny("lora")
    arrays = trainable_arrays(model)
    names = list(arrays.keys())
    assert names and all(("lora_" in n) or ("classifier" in n) for n in names)
    assert any("classifier" in n for n in names)
    total = sum(p.numel() for p in model.parameters())
    sent = sum(int(torch.tensor(a.shape).prod()) for a in arrays.values())
    assert sent == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sent < 0.01 * total


def test_full_finetuning_freezes_position_and_token_type_embeddings():
    model = _tiny("full")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"}


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_weights_round_trip_through_arrayrecord(finetuning):
    source, target = _tiny(finetuning), _tiny(finetuning)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    record = trainable_arrays(source)
    # what a node receives: the record serialised and rebuilt, as Flower transports it
    received = ArrayRecord(array_dict=dict(record.items()))
    load_trainable(target, received)
    for (name, a), (_, b) in zip(trainable_state(source).items(), trainable_state(target).items(), strict=True):
        assert torch.equal(a, b), name
    ids, mask = _batch()
    source.eval(), target.eval()
    assert torch.allclose(
        source(input_ids=ids, attention_mask=mask).logits, target(input_ids=ids, attention_mask=mask).logits
    )


def test_load_refuses_missing_unexpected_and_misshaped_tensors():
    model = _tiny()
    state = trainable_state(model)
    name = next(iter(state))
    missing = dict(state)
    missing.pop(name)
    with pytest.raises(WeightMismatchError, match="1 missing"):
        load_trainable(model, missing)
    with pytest.raises(WeightMismatchError, match="1 unexpected"):
        load_trainable(model, {**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(WeightMismatchError, match="shape"):
        load_trainable(model, {**state, name: torch.zeros(3, 3, 3)})


def test_lora_rank_and_targets_come_from_config():
    cfg = ModelConfig(name="tiny", lora=LoraConfig(r=2, alpha=4, target_modules=["query", "key", "value"]))
    model = build_model(cfg, LABELS)
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert any(".key." in n for n in names)
    assert all(model.get_parameter(n).shape[0] == 2 for n in names)
    with pytest.raises(ConfigError, match="target_modules"):
        build_model(ModelConfig(name="tiny", lora=LoraConfig(target_modules=["no_such_layer"])), LABELS)


def test_freeze_a_trains_and_exchanges_only_lora_b_and_the_head():
    plain = build_model(ModelConfig(name="tiny"), LABELS)
    cfg = ModelConfig(name="tiny", lora=LoraConfig(freeze_a=True))
    frozen_a, again = build_model(cfg, LABELS), build_model(cfg, LABELS)
    trainable = [n for n, p in frozen_a.named_parameters() if p.requires_grad]
    assert not any("lora_A" in n for n in trainable)
    assert any("lora_B" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert set(trainable_state(frozen_a)) == set(trainable) < set(trainable_state(plain))
    # A is drawn under model.init_seed: the same on every party, and covered by the base-model digest
    # that every node checks against the server's.
    a_names = [n for n, _ in frozen_a.named_parameters() if "lora_A" in n]
    assert a_names and all(torch.equal(frozen_a.get_parameter(n), again.get_parameter(n)) for n in a_names)
    assert base_model_digest(frozen_a) == base_model_digest(again) != base_model_digest(plain)
    with torch.no_grad():
        frozen_a.get_parameter(a_names[0]).add_(1.0)
    assert base_model_digest(frozen_a) != base_model_digest(again)


def test_unknown_model_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name=str(tmp_path / "missing")), LABELS)
    with pytest.raises(ConfigError, match="config.json"):
        build_model(ModelConfig(name=str(tmp_path)), LABELS)


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_exported_model_reloads_and_predicts_the_same(tmp_path, finetuning):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = _tiny(finetuning)
    with torch.no_grad():  # make the adapters non-trivial so merging matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    paths = export_model(model, build_tokenizer("tiny"), tmp_path / "model")
    assert ("adapter" in paths) == (finetuning == "lora")
    reloaded = AutoModelForSequenceClassification.from_pretrained(paths["merged"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["merged"])
    enc = tokenizer(["a good day", "terrible service"], padding=True, return_tensors="pt")
    model.eval()
    expected = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    got = reloaded(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert reloaded.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    if finetuning == "lora":
        from peft import PeftModel

        base = _tiny("full").eval()  # same seed, so the same frozen base the adapter was trained on
        with_adapter = PeftModel.from_pretrained(base, paths["adapter"]).eval()
        again = with_adapter(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        assert torch.allclose(expected, again, atol=1e-5)


def test_any_local_hugging_face_directory_is_a_model(tmp_path):
    """What GPU users bring (DistilBERT, RoBERTa ...): a directory with config.json and weights."""
    paths = export_model(_tiny("full"), build_tokenizer("tiny"), tmp_path / "exported")
    cfg = ModelConfig(name=paths["merged"], finetuning="lora")
    model = build_model(cfg, ["x", "y"])  # a new head for a new task: num_labels from the data
    assert model.config.num_labels == 2
    assert base_model_digest(model) == base_model_digest(build_model(cfg, ["x", "y"]))  # same fresh head everywhere
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    assert build_tokenizer(paths["merged"]).vocab_size == build_tokenizer("tiny").vocab_size
