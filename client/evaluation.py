"""Local evaluation: loss, accuracy, per-class counts (macro-F1, per-class precision / recall / F1) and the
confusion matrix, as sums the server adds up exactly across organisations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from fedpriv.client.tokenized import PadCollator, TokenizedTexts
from fedpriv.shared_models.class_scores import macro_f1


@dataclass(frozen=True)
class EvalCounts:
    """Sums, not ratios, so the server can combine organisations exactly."""

    num_examples: int
    loss_sum: float
    correct: int
    true_positive: list[int]
    false_positive: list[int]
    false_negative: list[int]
    # confusion[true][predicted]: what the per-class counts cannot say, which class is mistaken for which
    confusion: list[list[int]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_examples if self.num_examples else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_examples if self.num_examples else 0.0

    @property
    def macro_f1(self) -> float:
        return macro_f1(self.true_positive, self.false_positive, self.false_negative)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TokenizedTexts,
    *,
    num_labels: int,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> EvalCounts:
    model.to(device).eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=PadCollator(pad_token_id))
    loss_sum, correct = 0.0, 0
    tp, fp, fn = [0] * num_labels, [0] * num_labels, [0] * num_labels
    confusion = torch.zeros(num_labels * num_labels, dtype=torch.long)
    for input_ids, attention_mask, labels in loader:
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        labels = labels.to(device)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        predictions = logits.argmax(dim=-1)
        correct += int((predictions == labels).sum())
        for cls in range(num_labels):
            predicted, actual = predictions == cls, labels == cls
            tp[cls] += int((predicted & actual).sum())
            fp[cls] += int((predicted & ~actual).sum())
            fn[cls] += int((~predicted & actual).sum())
        confusion += torch.bincount(labels.cpu() * num_labels + predictions.cpu(), minlength=num_labels * num_labels)
    model.train()
    matrix = confusion.view(num_labels, num_labels).tolist()
    return EvalCounts(len(data), loss_sum, correct, tp, fp, fn, matrix)
