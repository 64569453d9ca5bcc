"""A BERT sequence classifier over the mean of the token states, the pooling sentence-transformers models use.

Why: checkpoints such as all-MiniLM-L6-v2 were trained so that the *mean* of their token states is the
sentence embedding; their [CLS] token and BERT pooler were never trained for it. A classifier on
``BertForSequenceClassification``'s pooled [CLS] has to learn a sentence summary from scratch, which DP-SGD's
noise drowns on small data sets (SST-2: the DP arms stayed at the majority class; see BENCHMARKS.md), while a
linear head on the mean-pooled embedding starts from features that already separate the classes.

This file is self-contained (only torch and transformers): ``save_pretrained`` copies it next to the weights
with an ``auto_map``, so an exported model loads with
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`` without fedpriv. Its own
``model_type`` keeps plain ``AutoModelForSequenceClassification`` from loading it silently as a [CLS] model
(which would use a random pooler).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "fedpriv_mean_pooled_bert"


class MeanPooledBertConfig(BertConfig):
    model_type = MODEL_TYPE


class MeanPooledBertForSequenceClassification(BertPreTrainedModel):
    """BERT encoder (no pooler) -> mean of the non-padding token states -> dropout -> linear head."""

    config_class = MeanPooledBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        ).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register() -> None:
    """Let the Auto classes (and ``save_pretrained``'s ``auto_map``) know this model; idempotent."""
    try:
        AutoConfig.register(MODEL_TYPE, MeanPooledBertConfig)
        AutoModelForSequenceClassification.register(MeanPooledBertConfig, MeanPooledBertForSequenceClassification)
    except ValueError:  # already registered in this process
        pass
    MeanPooledBertConfig.register_for_auto_class()
    MeanPooledBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")


register()
