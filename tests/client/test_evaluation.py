"""Local evaluation: the counts a node sends, the confusion matrix among them."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from fedpriv.client.evaluation import evaluate
from fedpriv.client.tokenized import TokenizedTexts


class Fixed(torch.nn.Module):
    """Predicts the class written in the first token of each example."""

    def forward(self, input_ids, attention_mask):
        return SequenceClassifierOutput(logits=torch.nn.functional.one_hot(input_ids[:, 0], 3).float() * 5)


def test_the_confusion_matrix_counts_true_class_rows_against_predicted_columns():
    labels = [0, 0, 1, 2, 2, 2, 1]
    predicted = [0, 1, 1, 2, 0, 2, 1]
    data = TokenizedTexts([torch.tensor([p, 7, 7]) for p in predicted], torch.tensor(labels))
    counts = evaluate(Fixed(), data, num_labels=3, batch_size=3, pad_token_id=0, device=torch.device("cpu"))
    assert counts.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert counts.correct == 5 and counts.true_positive == [1, 2, 2]
    assert counts.false_positive == [1, 1, 0] and counts.false_negative == [1, 0, 1]
