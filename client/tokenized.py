"""Redact and tokenise an organisation's texts once, and batch them with dynamic padding."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from fedpriv.kernel import atomic_files
from fedpriv.kernel.errors import DiskError

if TYPE_CHECKING:  # the redaction engine (Presidio, spaCy) is imported only when a node redacts
    from fedpriv.privacy.redaction import Redactor

CACHE_FORMAT = "fedpriv-tokens/2"  # 2: redaction rules in the key, counts stored


@dataclass(frozen=True)
class TokenizedTexts(Dataset):
    """Token ids (no padding) and label ids; items are ``(input_ids, label)`` tuples.

    Tuples (not dicts) so that Opacus's DPDataLoader can build empty batches.
    """

    input_ids: list[torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.labels[index]


def tokenize(texts: list[str], labels: list[int], tokenizer, max_length: int) -> TokenizedTexts:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    ids = [torch.tensor(row, dtype=torch.long) for row in encoded["input_ids"]]
    return TokenizedTexts(ids, torch.tensor(list(labels), dtype=torch.long))


_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its length, identity)


def tokenizer_identity(tokenizer) -> str:
    """A digest of everything that decides how the tokenizer splits text (its vocabulary and rules).

    Kept per tokenizer object (it serialises the whole vocabulary; asked for the train and the test split):
    computed again should tokens have been added to it since.
    """
    try:
        size, identity = _IDENTITIES[tokenizer]
        if size == len(tokenizer):
            return identity
    except (KeyError, TypeError):
        pass
    identity = _identity(tokenizer)
    try:
        _IDENTITIES[tokenizer] = (len(tokenizer), identity)
    except TypeError:  # not weakly referenceable: not kept
        pass
    return identity


def _identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # its truncation/padding settings change with every call: not part of the identity
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        rules = json.dumps(spec, sort_keys=True)
    else:
        rules = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}:{rules}".encode()).hexdigest()


@dataclass(frozen=True)
class PreparedTexts:
    """An organisation's tokenised (and, when on, redacted) texts and what redaction replaced, per kind."""

    data: TokenizedTexts
    redacted: dict[str, int] | None  # None: redaction off


def prepare_texts(
    texts: list[str],
    labels: list[int],
    tokenizer,
    max_length: int,
    cache_dir: Path | None = None,
    redactor: Redactor | None = None,
) -> PreparedTexts:
    """Redact (when a redactor is given), then tokenise; kept on disk under ``cache_dir`` when given.

    A deployment node starts a new process for every message, so without the
    cache it would redact and tokenise its data again every round. The cache
    holds only what training sees (token ids of the redacted text) and the
    counts; its key is a digest of the raw texts, labels, tokenizer, length and
    the redaction rules, so any change to one of them redacts and tokenises
    again. An unreadable cache file is ignored and rewritten.
    """
    if cache_dir is None:
        return _prepare(texts, labels, tokenizer, max_length, redactor)
    digest = hashlib.sha256()
    rules = redactor.digest if redactor is not None else None
    digest.update(json.dumps([CACHE_FORMAT, tokenizer_identity(tokenizer), max_length, rules, list(labels)]).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    path = Path(cache_dir) / f"{digest.hexdigest()[:32]}.pt"
    try:
        stored = torch.load(path, weights_only=True)
        if stored["format"] == CACHE_FORMAT and len(stored["lengths"]) == len(texts):
            ids = list(torch.split(stored["ids"].long(), stored["lengths"].tolist()))
            counts = json.loads(stored["redacted"]) if redactor is not None else None
            return PreparedTexts(TokenizedTexts(ids, stored["labels"]), counts)
    except (OSError, RuntimeError, KeyError, EOFError, ValueError, TypeError, pickle.UnpicklingError):
        pass  # missing or unreadable: redact and tokenise again
    prepared = _prepare(texts, labels, tokenizer, max_length, redactor)
    data = prepared.data
    lengths = torch.tensor([len(ids) for ids in data.input_ids], dtype=torch.long)
    flat = torch.cat(data.input_ids) if data.input_ids else torch.zeros(0, dtype=torch.long)
    stored = {"format": CACHE_FORMAT, "ids": flat.int(), "lengths": lengths, "labels": data.labels}
    stored["redacted"] = json.dumps(prepared.redacted)
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    try:
        atomic_files.write_bytes(path, buffer.getvalue(), 0o600)  # the node's own tokenised text: private
    except DiskError:
        pass  # a cache only: a full or read-only disk costs tokenising again next time, not the round
    return prepared


def _prepare(texts, labels, tokenizer, max_length: int, redactor: Redactor | None) -> PreparedTexts:
    if redactor is None:
        return PreparedTexts(tokenize(texts, labels, tokenizer, max_length), None)
    redacted, counts = redact_visible(texts, tokenizer, max_length, redactor)
    return PreparedTexts(tokenize(redacted, labels, tokenizer, max_length), counts)


# characters redacted past the last one the model sees: an identifier cut where redaction stops lies within them
VISIBLE_MARGIN = 256


def _visible_ends(texts: list[str], tokenizer, max_length: int) -> list[int]:
    """Where in each text the first ``max_length`` tokens (specials included) end, in characters.

    Straight from the Rust tokenizer (transformers' conversion of every encoding cost more than the
    tokenisation); the wrapper sets truncation and padding again on its next call.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    keep = max(0, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    ends = []
    for encoding in backend.encode_batch(texts, add_special_tokens=False):
        offsets = encoding.offsets[:keep]
        ends.append(max((end for _, end in offsets), default=0))
    return ends


def redact_visible(
    texts: list[str], tokenizer, max_length: int, redactor: Redactor
) -> tuple[list[str], dict[str, int]]:
    """Redact the part of each text tokenisation keeps (plus ``VISIBLE_MARGIN``), and drop the rest.

    Truncation to ``max_length`` tokens throws most of a long document away;
    redacting it would be wasted work. Each text is cut at the first space
    ``VISIBLE_MARGIN`` characters past its last kept token, redacted, and kept
    only if its tokens still end at least the margin before the cut
    (placeholders can let more text into the window): else the cut doubles,
    up to the whole text. The tokens are the same as from redacting the whole
    text; the counts are those of the redacted part. A tokenizer without
    offsets (a slow one) gets whole texts redacted.
    """
    if not getattr(tokenizer, "is_fast", False):
        result = redactor.redact(list(texts))
        return result.texts, result.counts
    out = list(texts)
    totals = {kind: 0 for kind in redactor.cfg.kinds}
    pending = list(range(len(out)))
    # a first guess from the raw text (its start is enough: the check after redaction is what guarantees)
    guesses = _visible_ends([text[: 6 * max_length] for text in texts], tokenizer, max_length)
    cuts = dict(zip(pending, (end + VISIBLE_MARGIN for end in guesses), strict=True))
    while pending:
        tried = {}
        for index in pending:
            text = texts[index]
            space = text.find(" ", cuts[index])
            tried[index] = text if cuts[index] >= len(text) or space < 0 else text[:space]
        redacted = {index: redactor.redact([part]) for index, part in tried.items()}
        ends = _visible_ends([redacted[i].texts[0] for i in pending], tokenizer, max_length)
        left = []
        for index, end in zip(pending, ends, strict=True):
            text = redacted[index].texts[0]
            whole = len(tried[index]) == len(texts[index])
            if whole or end <= len(text) - VISIBLE_MARGIN:
                out[index] = text
                for kind, count in redacted[index].counts.items():
                    totals[kind] += count
            else:
                cuts[index] *= 2
                left.append(index)
        pending = left
    return out, totals


class PadCollator:
    """Pads a batch to its longest sequence: (input_ids, attention_mask, labels)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[tuple[torch.Tensor, torch.Tensor]]):
        if not batch:
            raise ValueError("empty batch")  # DPDataLoader handles empty Poisson batches itself
        longest = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        labels = torch.stack([label for _, label in batch])
        return input_ids, attention_mask, labels
