"""The local training round: DP accounting never resets (even across a restart), empty batches, FedProx."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from fedpriv.client.tokenized import tokenize
from fedpriv.client.training import _noise_only_step, _proximal_step, round_learning_rate, train_locally
from fedpriv.kernel.config import ModelConfig, TrainingConfig
from fedpriv.privacy.accountant_state import NodePrivacy
from fedpriv.privacy.calibration import compute_epsilon, plan_privacy
from fedpriv.shared_models.builder import build_model, build_tokenizer

WORDS = "good bad great awful fine poor lovely horrible nice terrible".split()


def _data(n=40, seed=0):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]
    labels = [rng.randint(0, 1) for _ in range(n)]
    return tokenize(texts, labels, build_tokenizer("tiny"), max_length=16)


def _plan(n, rounds=2, batch=8, eps=4.0):
    return plan_privacy(
        org="org-0", num_examples=n, batch_size=batch, local_epochs=1, rounds=rounds,
        target_epsilon=eps, delta=1e-3, max_grad_norm=1.0, accountant="rdp",
    )  # fmt: skip


def _round(model, data, privacy, cfg):
    return train_locally(
        model, data, cfg=cfg, pad_token_id=0, device=torch.device("cpu"), privacy=privacy, grad_sample_mode="hooks"
    )


def test_epsilon_after_two_rounds_equals_one_go_even_across_a_restart(tmp_path):
    data = _data()
    cfg = TrainingConfig(batch_size=8, learning_rate=1e-3)
    plan = _plan(len(data))
    template = build_model(ModelConfig(name="tiny"), ["a", "b"])

    node = NodePrivacy.open(tmp_path, plan)
    first = _round(copy.deepcopy(template), data, node, cfg)
    node.save()
    eps_round_1 = node.epsilon()
    del node  # the node process restarts between rounds

    node = NodePrivacy.open(tmp_path, plan)
    assert node.steps == first.steps == plan.steps_per_round
    second = _round(copy.deepcopy(template), data, node, cfg)
    node.save()

    total_steps = first.steps + second.steps
    assert total_steps == plan.planned_steps
    one_go = compute_epsilon(
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=total_steps, delta=1e-3,
        accountant="rdp",
    )  # fmt: skip
    assert node.epsilon() == pytest.approx(one_go, rel=1e-12)
    assert eps_round_1 < node.epsilon() <= plan.target_epsilon


def test_training_changes_only_trainable_weights():
    data = _data()
    model = build_model(ModelConfig(name="tiny"), ["a", "b"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _round(model, data, None, TrainingConfig(batch_size=8, learning_rate=1e-2))
    for name, param in model.named_parameters():
        assert torch.equal(before[name], param) != param.requires_grad, name


def test_an_empty_poisson_batch_is_still_a_noised_accounted_step(tmp_path):
    data = _data(n=16)
    plan = _plan(len(data), batch=8)
    node = NodePrivacy.open(tmp_path, plan)
    model = build_model(ModelConfig(name="tiny"), ["a", "b"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    from torch.utils.data import DataLoader

    from fedpriv.client.tokenized import PadCollator

    loader = DataLoader(data, batch_size=8, collate_fn=PadCollator(0))
    model, optimizer, loader = node.make_private(model, optimizer, loader)
    before = [p.detach().clone() for p in params]
    _noise_only_step(optimizer, params)
    assert node.steps == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))  # noise was added


def test_proximal_step_pulls_towards_the_global_weights():
    param = torch.nn.Parameter(torch.tensor([2.0, -2.0]))
    anchor = torch.zeros(2)
    _proximal_step([param], [anchor], lr=0.5, mu=1.0)
    assert torch.allclose(param.detach(), torch.tensor([1.0, -1.0]))


def test_cosine_schedule_runs_from_the_learning_rate_to_its_floor_and_constant_stays():

    cosine = TrainingConfig(rounds=5, learning_rate=0.01, lr_schedule="cosine", min_lr_ratio=0.1)
    rates = [round_learning_rate(cosine, r) for r in range(1, 6)]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert rates[2] == pytest.approx(0.0055)  # half-way: the mean of start and floor
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert round_learning_rate(cosine, 9) == pytest.approx(0.001)  # never below the floor
    constant = TrainingConfig(rounds=5, learning_rate=0.01)
    assert {round_learning_rate(constant, r) for r in range(1, 6)} == {0.01}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_non_finite_loss_stops_the_round_at_its_step_and_the_steps_before_stay_accounted(tmp_path, optimizer):
    """learning_rate 1e30 sends the weights past float32 after one step: the next loss is NaN (issue 27)."""
    from fedpriv.client.training import TrainingDiverged

    data = _data()
    node = NodePrivacy.open(tmp_path, _plan(len(data)))
    model = build_model(ModelConfig(name="tiny"), ["a", "b"])
    with pytest.raises(TrainingDiverged, match=r"^training loss became non-finite \((nan|inf)\) at step \d+$") as info:
        _round(model, data, node, TrainingConfig(batch_size=8, learning_rate=1e30, optimizer=optimizer))
    assert info.value.kind in ("nan", "inf") and info.value.step >= 2
    assert node.steps == info.value.step - 1  # every step before it was noised and accounted; that one never ran
    assert node.epsilon() > 0
    plain = build_model(ModelConfig(name="tiny"), ["a", "b"])  # without DP too
    with pytest.raises(TrainingDiverged, match="non-finite"):
        _round(plain, data, None, TrainingConfig(batch_size=8, learning_rate=1e30, optimizer=optimizer))


def test_an_update_past_float32_stops_the_round_and_its_noised_step_is_accounted(tmp_path):
    """AdamW's first step is learning_rate / 0.1: 3e38 cannot be a float32 (torch raised 'overflow')."""
    from fedpriv.client.training import TrainingDiverged

    data = _data()
    node = NodePrivacy.open(tmp_path, _plan(len(data)))
    model = build_model(ModelConfig(name="tiny"), ["a", "b"])
    with pytest.raises(TrainingDiverged, match=r"^the update overflowed float32 .* at step 1$") as info:
        _round(model, data, node, TrainingConfig(batch_size=8, learning_rate=3e38))
    assert info.value.kind == "overflow"
    assert node.steps == 1  # Opacus noised and accounted the step before torch refused to apply it


@pytest.mark.parametrize("private", [False, True])
def test_the_progress_hook_hears_every_step_of_the_planned_round(tmp_path, private):
    data = _data()
    cfg = TrainingConfig(batch_size=8, learning_rate=1e-3)
    privacy = NodePrivacy.open(tmp_path, _plan(len(data))) if private else None
    calls = []
    result = train_locally(
        build_model(ModelConfig(name="tiny"), ["a", "b"]), data, cfg=cfg, pad_token_id=0,
        device=torch.device("cpu"), privacy=privacy, grad_sample_mode="hooks",
        progress=lambda *args: calls.append(args),
    )  # fmt: skip
    assert [c[0] for c in calls] == list(range(1, result.steps + 1))
    assert {c[1] for c in calls} == {len(data) // 8}  # planned: 5 batches of 8 (Poisson: 1 / q expected)
    assert calls[-1][2] == result.examples_seen
