"""Book-keeping clipping: both ways of taking a linear layer's norms, what it refuses, and its use in training.

The headline check (every mode against a per-example reference, full fine-tuning and LoRA, both loss
reductions) is test_clipping.py; this file checks what that one cannot reach.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedpriv.privacy.bookkeeping import (
    BookkeepingClipping,
    UnsupportedForBookkeeping,
    choose_clipping_mode,
    unsupported_reason,
)
from tests.privacy.test_clipping import B, _batch, _reference_per_example_grads, _tiny_bert


@pytest.mark.parametrize("linear_norms", ["ghost", "per_example"])
@pytest.mark.parametrize("finetuning", ["full", "lora", "lora-frozen-a"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_ghost_norms_and_formed_per_example_gradients_both_match_the_reference(pooling, finetuning, linear_norms):
    model = _tiny_bert(finetuning, pooling)
    ids, mask, labels = _batch()
    ref = _reference_per_example_grads(copy.deepcopy(model), ids, mask, labels)
    C = float(ref.norm(dim=1).median())
    clipping = BookkeepingClipping(model, max_grad_norm=C, loss_reduction="sum", linear_norms=linear_norms)
    logits = clipping(input_ids=ids, attention_mask=mask).logits
    nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    torch.testing.assert_close(clipping.per_example_norms().double(), ref.norm(dim=1), rtol=1e-5, atol=1e-7)
    assert clipping.write_clipped_sum()
    factors = (C / (ref.norm(dim=1) + 1e-6)).clamp(max=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    summed = torch.cat([p.grad.reshape(-1) for p in params]).double()
    torch.testing.assert_close(summed, (ref * factors[:, None]).sum(0), rtol=1e-5, atol=1e-6 * C)


class _WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean(-1))


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(self.layer(x))


def test_a_trainable_layer_it_does_not_know_is_refused_and_auto_falls_back_to_hooks():
    model = _WithConv()
    with pytest.raises(UnsupportedForBookkeeping, match="conv"):
        BookkeepingClipping(model, max_grad_norm=1.0)
    assert "Conv1d" in unsupported_reason(model)
    assert choose_clipping_mode(model, "auto") == "hooks"
    model.conv.requires_grad_(False)  # a frozen unsupported layer is fine
    assert unsupported_reason(model) is None and choose_clipping_mode(model, "auto") == "bk"
    assert choose_clipping_mode(model, "ghost") == "ghost"  # a configured mode is kept


def test_shared_weights_are_refused_rather_than_clipped_wrongly():
    clipping = BookkeepingClipping(_Shared(), max_grad_norm=1.0)
    with pytest.raises(UnsupportedForBookkeeping, match="twice"):
        clipping(torch.randn(3, 4))


def test_evaluation_without_gradients_is_the_plain_model_and_records_nothing():
    model = _tiny_bert("full").eval()
    ids, mask, _ = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    clipping = BookkeepingClipping(model, max_grad_norm=1.0)
    with torch.no_grad():
        assert torch.equal(clipping(input_ids=ids, attention_mask=mask).logits, expected)
    assert not clipping.write_clipped_sum()  # nothing to clip
    assert all(p.requires_grad for p in clipping.params)


def test_train_locally_uses_bookkeeping_accounts_every_step_and_removes_its_hooks(tmp_path):
    from fedpriv.client.tokenized import TokenizedTexts
    from fedpriv.client.training import train_locally
    from fedpriv.kernel.config import TrainingConfig
    from fedpriv.privacy import NodePrivacy
    from fedpriv.privacy.calibration import plan_privacy

    model = _tiny_bert("lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(3)
    data = TokenizedTexts(
        [torch.randint(1, 100, (int(n),), generator=gen) for n in torch.randint(3, 12, (40,), generator=gen)],
        torch.randint(0, 3, (40,), generator=gen),
    )
    plan = plan_privacy(
        org="org-a", num_examples=40, batch_size=8, local_epochs=1, rounds=2, target_epsilon=8.0, delta=1e-5,
        max_grad_norm=1.0, accountant="rdp",
    )  # fmt: skip
    privacy = NodePrivacy.open(tmp_path, plan)
    cfg = TrainingConfig(batch_size=8, local_epochs=1, learning_rate=0.01)
    result = train_locally(
        model, data, cfg=cfg, pad_token_id=0, device=torch.device("cpu"), privacy=privacy, grad_sample_mode="auto"
    )
    assert result.clipping_mode == "bk"
    assert result.steps == privacy.steps == 5  # every Poisson batch (empty ones too) is one accounted step
    assert all(not module._forward_hooks for module in model.modules())
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(before)  # noise and clipped gradients moved every trainable tensor


def test_an_empty_poisson_batch_is_a_noise_only_accounted_step(tmp_path):
    from fedpriv.client.training import _noise_only_step
    from fedpriv.privacy import NodePrivacy
    from tests.privacy.test_clipping import _plan

    model = _tiny_bert("lora")
    params = [p for p in model.parameters() if p.requires_grad]
    plan = _plan(1.0)
    plan = type(plan)(**{**plan.__dict__, "noise_multiplier": 1.0})
    node = NodePrivacy.open(tmp_path, plan)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(B, 1)), batch_size=B)
    _, optimizer, _ = node.make_private(model, torch.optim.SGD(params, lr=1.0), loader, grad_sample_mode="bk")
    before = [p.detach().clone() for p in params]
    _noise_only_step(optimizer, params)
    assert node.steps == 1
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_under_bf16_autocast_norms_and_sums_are_kept_in_float32_and_stay_close_to_the_reference():
    model = _tiny_bert("full")
    ids, mask, labels = _batch()
    ref = _reference_per_example_grads(copy.deepcopy(model), ids, mask, labels)
    clipping = BookkeepingClipping(model, max_grad_norm=1e-3, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = clipping(input_ids=ids, attention_mask=mask).logits
    nn.functional.cross_entropy(logits.float(), labels, reduction="sum").backward()
    norms = clipping.per_example_norms()
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), ref.norm(dim=1), rtol=0.05, atol=1e-4)
    clipping.write_clipped_sum()
    assert all(p.grad.dtype == torch.float32 for p in clipping.params)
    summed = torch.cat([p.grad.reshape(-1) for p in clipping.params]).double()
    assert summed.norm() <= B * 1e-3 * 1.001  # each example contributes at most C, whatever the precision


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_an_empty_poisson_batch_after_a_trained_one_is_still_a_noise_only_step(tmp_path, mode):
    from fedpriv.client.training import _noise_only_step
    from fedpriv.privacy import NodePrivacy
    from tests.privacy.test_clipping import _plan

    model = _tiny_bert("lora")
    params = [p for p in model.parameters() if p.requires_grad]
    node = NodePrivacy.open(tmp_path, _plan(1.0))
    ids, mask, labels = _batch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask, labels), batch_size=B)
    dp_model, optimizer, _ = node.make_private(model, torch.optim.SGD(params, lr=0.1), loader, grad_sample_mode=mode)
    optimizer.zero_grad()
    nn.functional.cross_entropy(dp_model(input_ids=ids, attention_mask=mask).logits, labels).backward()
    optimizer.step()
    _noise_only_step(optimizer, params)  # Opacus used to refuse: the trained batch's gradients were never cleared
    assert node.steps == 2


def test_dp_batches_are_not_drawn_from_the_public_run_seed(tmp_path, monkeypatch):
    """Poisson sampling's amplification assumes nobody can predict the batches: not the coordinator, not a peer."""
    from opacus.data_loader import DPDataLoader

    from fedpriv.client.tokenized import TokenizedTexts
    from fedpriv.client.training import train_locally
    from fedpriv.kernel.config import TrainingConfig
    from fedpriv.privacy import NodePrivacy
    from fedpriv.privacy.calibration import plan_privacy

    seeds: list[int] = []
    original = DPDataLoader.from_data_loader.__func__

    def spy(cls, data_loader, **kwargs):
        seeds.append(data_loader.generator.initial_seed())
        return original(cls, data_loader, **kwargs)

    monkeypatch.setattr(DPDataLoader, "from_data_loader", classmethod(spy))
    data = TokenizedTexts([torch.arange(1, 6)] * 16, torch.zeros(16, dtype=torch.long))
    plan = plan_privacy(
        org="org-a", num_examples=16, batch_size=4, local_epochs=1, rounds=4, target_epsilon=8.0, delta=1e-5,
        max_grad_norm=1.0, accountant="rdp",
    )  # fmt: skip
    for round_dir in ("r1", "r2"):
        privacy = NodePrivacy.open(tmp_path / round_dir, plan)
        train_locally(
            _tiny_bert("lora"), data, cfg=TrainingConfig(batch_size=4), pad_token_id=0, device=torch.device("cpu"),
            privacy=privacy, seed=7,
        )  # fmt: skip
    assert len(seeds) == 2 and seeds[0] != seeds[1] and 7 not in seeds
