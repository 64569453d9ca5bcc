"""Redacting only what tokenisation keeps gives the same tokens as redacting whole texts, boundaries included."""

from __future__ import annotations

import pytest

from fedpriv.client.tokenized import VISIBLE_MARGIN, redact_visible, tokenize
from fedpriv.data.corpora import load_bbc_news
from fedpriv.kernel.config import RedactionConfig
from fedpriv.privacy.redaction import redactor_for
from fedpriv.shared_models.builder import build_tokenizer

IDENTIFIERS = [
    "tessaly.okonkwo@riverside-health-example.org",
    "https://portal.riverside-health-example.org/chart/55210?view=full&tab=notes",
    "Harriet Pemberton",
    "020 7946 0374",
    "GB29 NWBK 6016 1331 9268 19",
    "born 2 August 1961",
]


@pytest.fixture(scope="module")
def setting():
    return build_tokenizer("minilm"), redactor_for(RedactionConfig(enabled=True)), load_bbc_news()[0]


@pytest.mark.parametrize("max_length", [16, 64])
def test_the_visible_part_redacted_gives_the_tokens_of_the_whole_text_redacted(setting, max_length):
    tokenizer, redactor, articles = setting
    texts = []
    # every identifier at every offset around where truncation cuts (a few hundred characters for these lengths)
    for offset in range(0, 24 * max_length, 7 * max_length // 8):
        for number, identifier in enumerate(IDENTIFIERS):
            article = articles[(offset + number) % len(articles)]
            cut = article.find(" ", offset)
            texts.append(f"{article[:cut]} {identifier} {article[cut:]}" if cut > 0 else f"{article} {identifier}")
    labels = [0] * len(texts)
    visible, counts = redact_visible(texts, tokenizer, max_length, redactor)
    whole = redactor.redact(texts)
    got = tokenize(visible, labels, tokenizer, max_length).input_ids
    expected = tokenize(whole.texts, labels, tokenizer, max_length).input_ids
    assert [ids.tolist() for ids in got] == [ids.tolist() for ids in expected]
    assert all(len(v) <= len(t) for v, t in zip(visible, texts, strict=True))
    assert sum(len(v) for v in visible) < sum(len(t) for t in whole.texts)  # the point: less text to redact
    assert 0 < sum(counts.values()) <= sum(whole.counts.values())


def test_a_redaction_that_lets_more_text_into_the_window_is_redacted_further(setting):
    """Placeholders shorter in tokens than what they replace pull later text in: the cut moves out."""
    tokenizer, redactor, articles = setting
    urls = " ".join(f"https://a{i}.example.org/{'x' * 40}/{i}" for i in range(12))  # many tokens each
    text = f"{urls} then Harriet Pemberton wrote from tessaly.okonkwo@riverside-health-example.org. {articles[0]}"
    (visible,), counts = redact_visible([text], tokenizer, 64, redactor)
    (whole,) = redactor.redact([text]).texts
    assert tokenize([visible], [0], tokenizer, 64).input_ids[0].tolist() == (
        tokenize([whole], [0], tokenizer, 64).input_ids[0].tolist()
    )
    # the raw text's first 64 tokens end inside the URLs; redacted, the name and the email come into view
    assert "[PERSON] wrote from [EMAIL]" in visible and counts["url"] == 12 and counts["email"] == 1
    assert len(visible) < len(whole) and len(visible) > VISIBLE_MARGIN
