"""Tokenise an organisation's texts once and batch them with dynamic padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


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
