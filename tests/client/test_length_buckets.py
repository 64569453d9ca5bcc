"""Length bucketing inside each logical batch: micro-batches of similar length, ONE step per logical batch.

The headline check: with the noise off, the update from a logical batch cut into length-sorted micro-batches
equals the update from one pass over the whole batch, in every clipping mode (book-keeping, Opacus hooks and
ghost) and without DP, for full fine-tuning and LoRA, with examples of very different lengths and a clipping
bound that clips half of them. One pass is itself checked against a per-example reference in
tests/privacy/test_clipping.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedpriv.client.tokenized import PadCollator, TokenizedTexts
from fedpriv.client.training import length_buckets, micro_batches, train_locally, train_step
from fedpriv.kernel.config import TrainingConfig, load_config
from fedpriv.kernel.errors import ConfigError
from fedpriv.privacy import NodePrivacy, PrivacyPlan
from tests.privacy.test_clipping import NUM_LABELS, _tiny_bert

LENGTHS = [40, 3, 17, 2, 33, 9, 5, 26, 12, 38]  # very different lengths, in no order
BUDGET = 64  # padded tokens per micro-batch: 1 x 40, 1 x 38, 1 x 33, 2 x 26.., ... several micro-batches


def _examples(lengths=LENGTHS, seed=1) -> TokenizedTexts:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 100, (n,), generator=gen) for n in lengths]
    return TokenizedTexts(ids, torch.randint(0, NUM_LABELS, (len(lengths),), generator=gen))


def _batch(lengths=LENGTHS):
    data = _examples(lengths)
    return PadCollator(0)([data[i] for i in range(len(data))])


def _per_example_norms(model, batch) -> torch.Tensor:
    ids, mask, labels = batch
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        width = int(mask[i].sum())
        logits = model(input_ids=ids[i : i + 1, :width], attention_mask=mask[i : i + 1, :width]).logits
        torch.nn.functional.cross_entropy(logits, labels[i : i + 1], reduction="sum").backward()
        norms.append(torch.cat([p.grad.reshape(-1) for p in params]).norm())
    model.zero_grad(set_to_none=True)
    return torch.stack(norms)


def _plan(max_grad_norm: float, num_examples: int) -> PrivacyPlan:
    return PrivacyPlan(
        target_epsilon=1.0, delta=1e-5, noise_multiplier=0.0, max_grad_norm=max_grad_norm, sample_rate=1.0,
        steps_per_round=1, planned_rounds=1, planned_steps=1, accountant="rdp", num_examples=num_examples,
    )  # fmt: skip


def _one_step(model, mode: str, cfg: TrainingConfig, batch, state_dir, max_grad_norm: float):
    """One train_step with SGD(lr=1) (so the update is minus the applied gradient); returns (update, stats, node)."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    criterion = torch.nn.CrossEntropyLoss()
    node = None
    if mode != "nondp":
        node = NodePrivacy.open(state_dir, _plan(max_grad_norm, len(batch[2])))
        loader = torch.utils.data.DataLoader(_examples(), batch_size=len(batch[2]), collate_fn=PadCollator(0))
        if mode == "ghost":
            model, optimizer, criterion, _ = node.make_private(
                model, optimizer, loader, grad_sample_mode="ghost", criterion=criterion
            )
        else:
            model, optimizer, _ = node.make_private(model, optimizer, loader, grad_sample_mode=mode)
    stats = train_step(model, optimizer, criterion, batch, cfg=cfg, device=torch.device("cpu"), private=mode != "nondp")
    update = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before, strict=True)])
    return update.double(), stats, node


@pytest.mark.parametrize("mode", ["nondp", "bk", "hooks", "ghost"])
@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_micro_batches_give_the_update_of_one_pass_over_the_logical_batch(tmp_path, finetuning, mode):
    template = _tiny_bert(finetuning)
    batch = _batch()
    norms = _per_example_norms(copy.deepcopy(template), batch)
    C = float(norms.median())  # half the examples are clipped, half are not
    assert 0 < (norms > C).sum() < len(LENGTHS)

    whole, whole_stats, whole_node = _one_step(
        copy.deepcopy(template), mode, TrainingConfig(), batch, tmp_path / "whole", C
    )
    cut, cut_stats, cut_node = _one_step(
        copy.deepcopy(template), mode, TrainingConfig(max_batch_tokens=BUDGET), batch, tmp_path / "cut", C
    )
    assert whole_stats.passes == 1 and cut_stats.passes >= 5  # really cut, into micro-batches of the budget
    assert cut_stats.padded_tokens < whole_stats.padded_tokens == len(LENGTHS) * max(LENGTHS)
    assert whole.abs().max() > 0
    torch.testing.assert_close(cut, whole, rtol=1e-4, atol=1e-7)
    if mode != "nondp":
        assert whole_node.steps == cut_node.steps == 1  # one accounted step per logical batch, not per micro-batch
        # every example contributes at most C: the applied gradient (sum / batch size) is at most C in norm
        assert cut.norm() <= C * (1 + 1e-4)


def test_an_overwriting_accumulation_would_be_caught(tmp_path, monkeypatch):
    """The check above can fail: if each micro-batch's clipped sum replaced the previous ones', it would."""
    from fedpriv.privacy.bookkeeping import _optimizer_class

    def overwrite(self):
        for p in self.params:
            p.summed_grad = p.grad.detach().clone()

    template = _tiny_bert("lora")
    batch = _batch()
    whole, _, _ = _one_step(copy.deepcopy(template), "bk", TrainingConfig(), batch, tmp_path / "a", 0.05)
    monkeypatch.setattr(_optimizer_class(), "accumulate", overwrite)
    cut, stats, _ = _one_step(
        copy.deepcopy(template), "bk", TrainingConfig(max_batch_tokens=BUDGET), batch, tmp_path / "b", 0.05
    )
    assert stats.passes > 1
    assert not torch.allclose(cut, whole, rtol=1e-3, atol=1e-6)


def test_micro_batches_are_length_sorted_within_budget_and_cover_the_batch_once():
    lengths = torch.tensor(LENGTHS)
    groups = length_buckets(lengths, max_tokens=BUDGET, max_examples=None)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(LENGTHS)))
    widths = [int(lengths[g].max()) for g in groups]
    assert widths == sorted(widths, reverse=True)  # longest micro-batch first
    assert all(len(g) * w <= BUDGET or len(g) == 1 for g, w in zip(groups, widths, strict=True))
    flat = lengths[torch.cat(groups)].tolist()
    assert flat == sorted(LENGTHS, reverse=True)  # similar lengths share a micro-batch
    # an example longer than the budget still runs, alone
    assert [g.tolist() for g in length_buckets(torch.tensor([5, 90, 4]), max_tokens=64, max_examples=None)] == [
        [1],
        [0, 2],
    ]
    # a cap on examples alone
    assert [len(g) for g in length_buckets(lengths, max_tokens=None, max_examples=4)] == [4, 4, 2]


def test_sorting_processes_fewer_padded_tokens_than_cutting_in_sampled_order():
    lengths = [40, 3, 38, 2, 36, 4, 34, 5]  # long and short alternate
    batch = _batch(lengths)

    def padded(cfg):
        return sum(piece[0].numel() for piece in micro_batches(batch, cfg))

    sorted_tokens = padded(TrainingConfig(max_physical_batch_size=2))
    unsorted_tokens = padded(TrainingConfig(max_physical_batch_size=2, sort_by_length=False))
    whole = padded(TrainingConfig())
    assert sorted_tokens == 2 * (40 + 36 + 5 + 3) and unsorted_tokens == 2 * (40 + 38 + 36 + 34)
    assert sorted_tokens < unsorted_tokens < whole
    for ids, mask, labels in micro_batches(batch, TrainingConfig(max_physical_batch_size=2)):
        assert mask[:, -1].any() and len(ids) == len(labels) == 2  # each piece cut to its own longest example


@pytest.mark.parametrize("mode", ["bk", "hooks", "ghost"])
def test_train_locally_accounts_one_step_per_logical_batch(tmp_path, mode):
    from fedpriv.privacy.calibration import plan_privacy

    gen = torch.Generator().manual_seed(5)
    data = _examples([int(n) for n in torch.randint(2, 40, (48,), generator=gen)])
    plan = plan_privacy(
        org="org-a", num_examples=48, batch_size=12, local_epochs=1, rounds=2, target_epsilon=8.0, delta=1e-5,
        max_grad_norm=1.0, accountant="rdp",
    )  # fmt: skip
    node = NodePrivacy.open(tmp_path, plan)
    cfg = TrainingConfig(batch_size=12, learning_rate=0.01, max_batch_tokens=64)
    result = train_locally(
        _tiny_bert("lora"), data, cfg=cfg, pad_token_id=0, device=torch.device("cpu"), privacy=node,
        grad_sample_mode=mode,
    )  # fmt: skip
    assert result.clipping_mode == mode
    assert result.steps == node.steps == plan.steps_per_round == 4
    assert len(node.accountant.history) == 1 and node.accountant.history[0][2] == 4  # (sigma, q, steps)
    assert result.micro_batches > 2 * result.steps


@pytest.mark.parametrize("proximal_mu", [0.0, 0.5])
def test_non_private_rounds_are_the_same_with_and_without_micro_batches(proximal_mu):
    """Several logical batches and the FedProx step: once per logical batch, not per micro-batch."""
    gen = torch.Generator().manual_seed(6)
    data = _examples([int(n) for n in torch.randint(2, 40, (30,), generator=gen)])
    template = _tiny_bert("full")
    models = []
    for limits in ({}, {"max_batch_tokens": 64}):
        model = copy.deepcopy(template)
        cfg = TrainingConfig(batch_size=10, optimizer="sgd", learning_rate=0.5, **limits)
        result = train_locally(
            model, data, cfg=cfg, pad_token_id=0, device=torch.device("cpu"), privacy=None, proximal_mu=proximal_mu,
            seed=3,
        )  # fmt: skip
        assert result.steps == 3 and result.examples_seen == 30
        models.append(torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]))
    start = torch.cat([p.detach().reshape(-1) for p in template.parameters() if p.requires_grad])
    assert not torch.allclose(models[0], start)
    torch.testing.assert_close(models[1], models[0], rtol=1e-4, atol=1e-6)


def test_config_keys_default_to_one_pass_and_are_validated_in_one_line():
    cfg = load_config(None)
    assert (cfg.training.max_batch_tokens, cfg.training.max_physical_batch_size) == (None, None)
    assert cfg.training.sort_by_length is True
    cfg = load_config(None, ["training.max_batch_tokens=1024", "training.max_physical_batch_size=8"])
    assert (cfg.training.max_batch_tokens, cfg.training.max_physical_batch_size) == (1024, 8)
    for override, message in [
        ("training.max_batch_tokens=0", "config: training.max_batch_tokens: expected an integer > 0 or null, got 0"),
        ("training.max_physical_batch_size=-1", "config: training.max_physical_batch_size: expected an integer > 0"),
        ("training.max_batch_tokens=32", "config: training.max_batch_tokens: expected >= data.max_length (64)"),
        ("training.sort_by_length=maybe", "config: training.sort_by_length: expected true or false"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_config(None, [override])
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
