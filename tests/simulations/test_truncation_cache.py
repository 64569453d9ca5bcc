"""The plan's truncation counts kept on disk: counted once per data, tokenizer and max_length, then read back."""

from __future__ import annotations

import json

import pytest

from fedpriv.client.data_report import truncation
from fedpriv.simulations import truncation_cache
from fedpriv.simulations.truncation_cache import CACHE_ENV, cache_folder, plan_truncation


class WordTokenizer:
    """A slow (no Rust backend) tokenizer: one token per word plus [CLS] and [SEP]."""

    def __call__(self, texts, truncation=False, padding=False):
        assert truncation is False and padding is False
        return {"input_ids": [[0] * (len(text.split()) + 2) for text in texts]}


TEXTS = {
    "org-a": ["one two three", "a b c d e f g h i j", "x"],
    "org-b": ["word " * 30, "short one", "two words", "again three words"],
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"vocab": 1}')
    (model / "model.safetensors").write_bytes(b"weights")
    return model


class Builds:
    """``build_tokenizer`` that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return WordTokenizer()


def test_counts_are_kept_and_read_back_without_the_tokenizer(cache):
    first = Builds()
    counted = plan_truncation(cache, first, TEXTS, 5)
    assert first.calls == 1  # once for both organisations
    assert counted == {org: truncation(texts, WordTokenizer(), 5) for org, texts in TEXTS.items()}
    assert counted["org-b"].truncated == 1 and counted["org-a"].median_tokens == 5
    again = Builds()
    assert plan_truncation(cache, again, TEXTS, 5) == counted
    assert again.calls == 0  # another process: read back, the tokenizer never loaded
    (kept,) = cache_folder().glob("*.json")  # one file per plan
    stored = json.loads(kept.read_text())
    assert list(stored) == ["orgs"] and list(stored["orgs"]) == ["org-a", "org-b"]
    for counts in stored["orgs"].values():  # counts only: no text, no per-text digest
        assert set(counts) == {"texts", "truncated", "median_tokens", "max_length", "share"}


@pytest.mark.parametrize(
    "change", ["text", "text moved to the other organisation", "max_length", "tokenizer file", "library version"]
)
def test_anything_that_decides_the_counts_counts_again(cache, monkeypatch, change):
    plan_truncation(cache, Builds(), TEXTS, 5)
    texts, max_length = {org: list(t) for org, t in TEXTS.items()}, 5
    if change == "text":
        texts["org-a"][0] += " four"
    elif change == "text moved to the other organisation":
        texts["org-b"].append(texts["org-a"].pop())
    elif change == "max_length":
        max_length = 6
    elif change == "tokenizer file":
        (cache / "tokenizer.json").write_text('{"vocab": 2}')
    else:
        monkeypatch.setattr(truncation_cache, "_version", lambda package: "99")
    builds = Builds()
    counted = plan_truncation(cache, builds, texts, max_length)
    assert builds.calls == 1
    assert counted == {org: truncation(t, WordTokenizer(), max_length) for org, t in texts.items()}


def test_the_weights_are_not_part_of_the_key(cache):
    plan_truncation(cache, Builds(), TEXTS, 5)
    (cache / "model.safetensors").write_bytes(b"fine-tuned")
    builds = Builds()
    plan_truncation(cache, builds, TEXTS, 5)
    assert builds.calls == 0


@pytest.mark.parametrize("damage", ["garbage", "empty", "wrong counts", "a folder"])
def test_a_damaged_file_is_counted_again_and_rewritten(cache, damage):
    counted = plan_truncation(cache, Builds(), TEXTS, 5)
    for path in cache_folder().glob("*.json"):
        if damage == "a folder":
            path.unlink()
            path.mkdir()
        else:
            raw = {"texts": 99, "truncated": 0, "median_tokens": 1, "max_length": 5}
            wrong = {"orgs": {"org-a": raw, "org-b": raw}}
            path.write_text({"garbage": "{not json", "empty": "", "wrong counts": json.dumps(wrong)}[damage])
    builds = Builds()
    assert plan_truncation(cache, builds, TEXTS, 5) == counted
    assert builds.calls == 1


def test_a_cache_folder_that_cannot_be_written_only_costs_the_counting(cache, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    builds = Builds()
    assert plan_truncation(cache, builds, TEXTS, 5) == plan_truncation(cache, Builds(), TEXTS, 5)
    assert builds.calls == 1


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == tmp_path / "xdg" / "fedpriv" / "truncation"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder() == tmp_path / "home" / ".cache" / "fedpriv" / "truncation"


def test_without_a_home_folder_nothing_is_kept_and_the_counts_are_the_same(cache, tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    assert cache_folder() is None
    builds = Builds()
    assert plan_truncation(cache, builds, TEXTS, 5) == {
        org: truncation(t, WordTokenizer(), 5) for org, t in TEXTS.items()
    }
    assert builds.calls == 1
