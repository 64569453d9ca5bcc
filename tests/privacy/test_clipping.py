"""Per-sample clipping through NodePrivacy.make_private on a tiny BERT equals a per-example reference.

Conventions (explicit, since Opacus rescales):
- The reference gradient of example i is d loss_i / d theta, loss_i the cross-entropy of example i
  alone (a batch of one, reduction "sum" = the example's own loss).
- Opacus's per-sample gradients are the same quantity whatever ``loss_reduction`` is: with "mean"
  the hooks multiply the backprops by the batch size to undo the mean.
- ``p.summed_grad`` (after ``optimizer.pre_step()``) is the SUM over examples of the clipped
  per-sample gradients, clip factor min(1, C / (norm + 1e-6)), norm over ALL trainable parameters.
- ``p.grad`` after ``pre_step()`` with noise 0 is that sum, divided by ``expected_batch_size`` for
  "mean" and left as is for "sum".
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedpriv.privacy import NodePrivacy, PrivacyPlan

B, L, NUM_LABELS = 6, 12, 3
LENGTHS = [12, 9, 5, 12, 3, 7]  # padded positions get attention_mask 0


def _tiny_bert(finetuning: str, pooling: str = "cls"):
    """``pooling`` "cls": BertForSequenceClassification; "mean": the mean-pooled head (fedpriv.shared_models.mean_pooling).

    ``finetuning`` "lora-frozen-a": LoRA with its A matrices frozen (model.lora.freeze_a).
    """
    from transformers import BertConfig, BertForSequenceClassification

    from fedpriv.shared_models.mean_pooling import MeanPooledBertConfig, MeanPooledBertForSequenceClassification

    config_class, model_class = (
        (MeanPooledBertConfig, MeanPooledBertForSequenceClassification)
        if pooling == "mean"
        else (BertConfig, BertForSequenceClassification)
    )
    torch.manual_seed(0)
    config = config_class(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        num_labels=NUM_LABELS,
    )
    model = model_class(config)
    if finetuning.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
        model = get_peft_model(model, lora)
        # Make LoRA's B non-zero so that A gets a gradient too (B = 0 at init).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
                if "lora_A" in name and finetuning == "lora-frozen-a":
                    p.requires_grad_(False)
        assert any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)
    else:
        # Opacus gives these two embeddings batch-1 per-sample grads (see stack-facts): freeze them.
        model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
        model.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)
    model.train()
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, n:] = 0
        ids[i, n:] = 0
    labels = torch.randint(0, NUM_LABELS, (B,), generator=gen)
    return ids, mask, labels


def _reference_per_example_grads(model, ids, mask, labels) -> torch.Tensor:
    """(B, P): each example alone through an unwrapped model, all trainable grads flattened."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(B):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
        torch.nn.functional.cross_entropy(logits, labels[i : i + 1], reduction="sum").backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return torch.stack(rows).double()


def _plan(max_grad_norm: float) -> PrivacyPlan:
    return PrivacyPlan(
        target_epsilon=1.0,
        delta=1e-5,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        sample_rate=1.0,  # one batch holding the whole toy dataset
        steps_per_round=1,
        planned_rounds=1,
        planned_steps=1,
        accountant="rdp",
        num_examples=B,
    )


@pytest.mark.parametrize("clip", ["small", "mixed"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost", "bk"])
@pytest.mark.parametrize("finetuning", ["full", "lora", "lora-frozen-a"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_opacus_clipping_matches_per_example_reference(
    tmp_path, pooling, finetuning, grad_sample_mode, loss_reduction, clip
):
    from torch.utils.data import DataLoader, TensorDataset

    model = _tiny_bert(finetuning, pooling)
    reference_model = copy.deepcopy(model)
    ids, mask, labels = _batch()

    ref = _reference_per_example_grads(reference_model, ids, mask, labels)
    ref_norms = ref.norm(dim=1)
    # "small": every example is clipped; "mixed": half are, half are left alone.
    middle = ref_norms.sort().values[B // 2 - 1 : B // 2 + 1]
    C = 0.01 if clip == "small" else float(middle.mean())
    assert (ref_norms > C).sum() == (B if clip == "small" else B // 2)
    factors = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    ref_clipped = ref * factors[:, None]
    ref_sum = ref_clipped.sum(dim=0)
    assert (ref_clipped.norm(dim=1) <= C * (1 + 1e-5)).all()

    node = NodePrivacy.open(tmp_path, _plan(C))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=B)
    criterion = torch.nn.CrossEntropyLoss(reduction=loss_reduction)
    wrapped = node.make_private(
        model, optimizer, loader, grad_sample_mode=grad_sample_mode, criterion=criterion, loss_reduction=loss_reduction
    )
    if grad_sample_mode == "ghost":
        dp_model, dp_optimizer, criterion, _ = wrapped
    else:
        dp_model, dp_optimizer, _ = wrapped

    dp_optimizer.zero_grad()
    loss = criterion(dp_model(input_ids=ids, attention_mask=mask).logits, labels)
    loss.backward()

    if grad_sample_mode == "hooks":
        # Per-sample grads before clipping equal the reference per-example grads.
        per_sample = torch.cat([p.grad_sample.reshape(B, -1) for p in params], dim=1).double()
        torch.testing.assert_close(per_sample, ref, rtol=1e-4, atol=1e-7)
        opacus_norms = per_sample.norm(dim=1)
    elif grad_sample_mode == "bk":
        assert all(p.grad is None for p in params)  # the backward pass computed no weight gradient
        opacus_norms = dp_model.per_example_norms().double()
    else:
        opacus_norms = dp_model.get_norm_sample().double()
    torch.testing.assert_close(opacus_norms, ref_norms, rtol=1e-5, atol=1e-7)
    if grad_sample_mode == "ghost":
        coef = dp_model.get_clipping_coef().double()
    elif grad_sample_mode == "bk":
        coef = dp_model.clip_factors().double()
    else:
        coef = (C / (opacus_norms + 1e-6)).clamp(max=1.0)  # DPOptimizer.clip_and_accumulate's factor
    # (b) every clipped per-sample gradient has norm <= C
    assert (coef * opacus_norms <= C * (1 + 1e-5)).all()
    assert torch.equal(coef < 1, factors < 1)

    assert dp_optimizer.pre_step()  # clip (hooks) / accumulate (ghost), add noise (0 here), scale
    assert node.steps == 1  # the step went into this node's accountant

    # (a) Opacus's summed clipped gradient equals the per-example reference.
    summed = torch.cat([p.summed_grad.reshape(-1) for p in params]).double()
    torch.testing.assert_close(summed, ref_sum, rtol=1e-5, atol=1e-6 * C)

    # The gradient the optimizer applies follows the loss-reduction convention.
    applied = torch.cat([p.grad.reshape(-1) for p in params]).double()
    divisor = dp_optimizer.expected_batch_size if loss_reduction == "mean" else 1
    assert divisor == (B if loss_reduction == "mean" else 1)
    torch.testing.assert_close(applied, ref_sum / divisor, rtol=1e-5, atol=1e-6 * C)
