"""Tokenised data is cached on disk (deployment: a new process per message) and re-made when anything changes."""

from __future__ import annotations

import torch

from fedpriv.client.tokenized import prepare_texts, tokenize
from fedpriv.kernel.config import RedactionConfig
from fedpriv.privacy.redaction import Redactor, redactor_for
from fedpriv.shared_models.builder import build_tokenizer

TEXTS = ["The central bank held rates.", "A late goal won the cup final for the home side.", "Shares fell 3%."]


def tokenize_cached(texts, labels, tokenizer, max_length, cache_dir):
    return prepare_texts(texts, labels, tokenizer, max_length, cache_dir).data


def test_a_second_process_reads_the_cache_instead_of_tokenising(tmp_path, monkeypatch):
    tokenizer = build_tokenizer("minilm")
    first = tokenize_cached(TEXTS, [0, 1, 0], tokenizer, 16, tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr("fedpriv.client.tokenized.tokenize", refuse)
    again = tokenize_cached(TEXTS, [0, 1, 0], tokenizer, 16, tmp_path)
    expected = tokenize(TEXTS, [0, 1, 0], tokenizer, 16)
    assert all(torch.equal(a, b) for a, b in zip(again.input_ids, expected.input_ids, strict=True))
    assert torch.equal(again.labels, expected.labels) and len(again) == len(first) == 3


def test_changed_texts_labels_or_length_make_a_new_entry_and_a_broken_file_is_replaced(tmp_path):
    tokenizer = build_tokenizer("minilm")
    tokenize_cached(TEXTS, [0, 1, 0], tokenizer, 16, tmp_path)
    tokenize_cached([TEXTS[0], "[EMAIL] wrote in.", TEXTS[2]], [0, 1, 0], tokenizer, 16, tmp_path)
    tokenize_cached(TEXTS, [1, 1, 0], tokenizer, 16, tmp_path)
    tokenize_cached(TEXTS, [0, 1, 0], tokenizer, 8, tmp_path)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 4
    for path in files:
        path.write_bytes(b"garbage")
    short = tokenize_cached(TEXTS, [0, 1, 0], tokenizer, 8, tmp_path)
    assert max(len(ids) for ids in short.input_ids) == 8
    assert sum(1 for p in tmp_path.glob("*.pt") if p.read_bytes() != b"garbage") == 1


def test_a_simulation_process_keeps_the_organisations_it_served(monkeypatch):
    from fedpriv.client import node
    from fedpriv.kernel.config import load_config

    monkeypatch.setattr(node, "_NODES", type(node._NODES)())
    loads: list[int] = []

    def load(which):
        return lambda: loads.append(which) or which

    cfg = load_config()
    for which in [0, 1, 2, 0, 1, 2, 0]:
        assert node._cached(cfg, which, load(which)) == which
    assert loads == [0, 1, 2]
    other = load_config(overrides=["training.rounds=7"])
    node._cached(other, 0, load(0))  # another run: nothing of the first is kept
    assert loads == [0, 1, 2, 0] and len(node._NODES) == 1


PII_TEXTS = ["Write to ruth.okafor@example.org today.", "Call 020 7946 0958 before noon.", "Shares fell 3%."]


def test_a_redacting_node_keeps_only_redacted_tokens_and_counts_and_never_redacts_twice(tmp_path):
    tokenizer = build_tokenizer("minilm")
    redactor = redactor_for(RedactionConfig(enabled=True, kinds=["email", "phone"]))
    first = prepare_texts(PII_TEXTS, [0, 1, 0], tokenizer, 32, tmp_path, redactor)
    assert first.redacted == {"email": 1, "phone": 1}
    (path,) = tmp_path.glob("*.pt")
    stored = torch.load(path, weights_only=True)
    email_ids = tokenizer("ruth.okafor@example.org", add_special_tokens=False)["input_ids"]
    flat = stored["ids"].tolist()
    assert not any(flat[i : i + len(email_ids)] == email_ids for i in range(len(flat)))
    assert b"okafor" not in path.read_bytes() and b"7946" not in path.read_bytes()

    fresh = Redactor(redactor.cfg)  # a new process: same rules, nothing built yet
    again = prepare_texts(PII_TEXTS, [0, 1, 0], tokenizer, 32, tmp_path, fresh)
    assert "analyzer" not in vars(fresh)  # served from the cache: Presidio and spaCy never even load
    assert again.redacted == first.redacted
    assert all(torch.equal(a, b) for a, b in zip(again.data.input_ids, first.data.input_ids, strict=True))
    # other rules: another entry (the raw-text digest alone would hand back the other rules' tokens)
    other = redactor_for(RedactionConfig(enabled=True, kinds=["email"]))
    assert prepare_texts(PII_TEXTS, [0, 1, 0], tokenizer, 32, tmp_path, other).redacted == {"email": 1}
    unredacted = prepare_texts(PII_TEXTS, [0, 1, 0], tokenizer, 32, tmp_path)
    assert unredacted.redacted is None and len(list(tmp_path.glob("*.pt"))) == 3


def test_the_tokenizer_identity_is_worked_out_once_per_tokenizer_and_again_after_added_tokens(monkeypatch):
    import copy

    from fedpriv.client import tokenized

    tokenizer = copy.deepcopy(build_tokenizer("minilm"))  # its own: build_tokenizer's is shared, and tokens get added
    worked_out = []
    real = tokenized._identity
    monkeypatch.setattr(tokenized, "_identity", lambda t: worked_out.append(t) or real(t))
    first = tokenized.tokenizer_identity(tokenizer)
    assert tokenized.tokenizer_identity(tokenizer) == first and len(worked_out) == 1
    tokenizer.add_tokens(["[PATIENT_ID]"])  # a different split from now on: the cache key must change
    assert tokenized.tokenizer_identity(tokenizer) != first and len(worked_out) == 2
