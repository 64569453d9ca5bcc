"""One organisation's local training round: DP-SGD through Opacus, or plain SGD for baselines.

The same loop serves simulation and deployment; DP only changes how the model,
optimizer and data loader are wrapped.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from fedpriv.client.tokenized import PadCollator, TokenizedTexts
from fedpriv.kernel.config import TrainingConfig
from fedpriv.privacy.accountant_state import NodePrivacy
from fedpriv.privacy.bookkeeping import BookkeepingClipping, choose_clipping_mode

if TYPE_CHECKING:
    from fedpriv.privacy.gradient_canaries import DiracCanaries


class TrainingDiverged(RuntimeError):
    """The loss or the update stopped being finite: the round ends at that step, and nothing it trained leaves.

    ``kind``: "nan" or "inf" (a loss), "overflow" (an optimizer step past float32), "update" (non-finite weights).
    """

    def __init__(self, what: str, step: int, kind: str):
        super().__init__(f"{what} at step {step}")
        self.step, self.kind = step, kind


def _finite_loss(loss: torch.Tensor, step: int) -> float:
    """The loss as a float; :class:`TrainingDiverged` before any gradient of a non-finite one is taken."""
    value = float(loss.detach())
    if not math.isfinite(value):
        kind = "nan" if math.isnan(value) else "inf"
        raise TrainingDiverged(f"training loss became non-finite ({kind})", step, kind)
    return value


def _optimizer_step(optimizer, step: int) -> None:
    """``optimizer.step()``; an update torch cannot represent in float32 is :class:`TrainingDiverged`.

    Under DP the step is noised and accounted before the parameters change (Opacus's ``pre_step``), so a step
    that fails here is still counted by the accountant, as it must be.
    """
    try:
        optimizer.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise TrainingDiverged(f"the update overflowed float32 ({exc})", step, "overflow") from None


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    examples_seen: int
    clipping_mode: str | None = None  # the per-example clipping used under DP (None: no DP)
    micro_batches: int = 0  # forward/backward passes (more than ``steps`` when logical batches are cut)
    padded_tokens: int = 0  # token positions those passes processed, padding included


def round_learning_rate(cfg: TrainingConfig, server_round: int) -> float:
    """The learning rate of round ``server_round`` (1-based) of ``cfg.rounds`` under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "constant" or cfg.rounds == 1:
        return cfg.learning_rate
    progress = min(max(server_round - 1, 0), cfg.rounds - 1) / (cfg.rounds - 1)
    floor = cfg.min_lr_ratio
    return cfg.learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _noise_only_step(optimizer, params: list[torch.nn.Parameter], step: int = 1) -> None:
    """An empty Poisson batch is still one DP step: zero gradient + noise, and it is accounted."""
    optimizer.zero_grad(set_to_none=True)  # what the previous batch left (Opacus refuses uncleared gradients)
    for param in params:
        param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
        param.grad = torch.zeros_like(param)  # what ghost clipping's optimizer reads
    _optimizer_step(optimizer, step)
    optimizer.zero_grad(set_to_none=True)


def _attach_canaries(canaries, optimizer, params, *, cfg, privacy, examples: int, seed: int) -> None:
    from fedpriv.privacy.gradient_canaries import CanaryInjector, attach_to_dp_optimizer, attach_to_plain_optimizer

    if privacy is None:  # a baseline: reproducible, the canaries sampled at the rate DP-SGD would use
        rate, generator = min(1.0, cfg.batch_size / examples), torch.Generator().manual_seed(seed + 1)
        injector = CanaryInjector(canaries, params, norm=canaries.norm, sample_rate=rate, generator=generator)
        attach_to_plain_optimizer(optimizer, injector, cfg.batch_size)
    else:  # the sampling is as secret as the batches'
        plan = privacy.plan
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        injector = CanaryInjector(
            canaries, params, norm=plan.max_grad_norm, sample_rate=plan.sample_rate, generator=generator
        )
        attach_to_dp_optimizer(optimizer, injector)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def loader_workers(device: torch.device) -> int:
    """Batches are pre-tokenised and padded in microseconds: on CPU a worker would only take a core from the
    matrix products; on a GPU two workers keep the next batches ready while the device computes."""
    return 2 if device.type == "cuda" else 0


def _proximal_step(params, anchors, lr: float, mu: float) -> None:
    """FedProx's proximal term as a decoupled step towards the global weights.

    It depends on no data, so applied after the private update it is
    post-processing and costs no privacy.
    """
    with torch.no_grad():
        for param, anchor in zip(params, anchors, strict=True):
            param.sub_(lr * mu * (param - anchor))


def length_buckets(
    lengths: torch.Tensor, *, max_tokens: int | None, max_examples: int | None, sort: bool = True
) -> list[torch.Tensor]:
    """Cut one logical batch into micro-batches: index tensors into the batch, in the order they run.

    Each micro-batch is padded to its own longest example, so at most ``max_tokens`` padded positions
    (micro-batch size x its longest length; an example longer than that goes alone) and at most
    ``max_examples`` examples. Sorted longest first, examples of similar length share a micro-batch
    (little padding), and the largest micro-batch runs first: a budget that does not fit in memory fails
    on the first batch, not mid-round. ``sort=False`` keeps the sampled order.
    """
    order = torch.argsort(lengths, descending=True, stable=True) if sort else torch.arange(len(lengths))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        widest = max(longest, length)
        full = max_examples is not None and len(current) >= max_examples
        if current and (full or (max_tokens is not None and (len(current) + 1) * widest > max_tokens)):
            groups.append(current)
            current, widest = [], length
        current.append(index)
        longest = widest
    if current:
        groups.append(current)
    return [torch.tensor(group, dtype=torch.long) for group in groups]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def micro_batches(batch: Batch, cfg: TrainingConfig) -> list[Batch]:
    """``batch`` (input_ids, attention_mask, labels; padded on the right) as the micro-batches ``cfg`` asks for,
    each cut to its own longest example; the batch itself when no limit is set."""
    if cfg.max_batch_tokens is None and cfg.max_physical_batch_size is None:
        return [batch]
    input_ids, attention_mask, labels = batch
    lengths = attention_mask.sum(1)
    pieces = []
    for index in length_buckets(
        lengths, max_tokens=cfg.max_batch_tokens, max_examples=cfg.max_physical_batch_size, sort=cfg.sort_by_length
    ):
        width = int(lengths[index].max())
        if attention_mask[index, width:].any():
            raise ValueError("micro-batching needs right-padded batches (attention_mask 1s first)")
        pieces.append((input_ids[index, :width], attention_mask[index, :width], labels[index]))
    return pieces


@dataclass
class StepStats:
    """What one logical batch cost: summed loss, examples, forward/backward passes, padded token positions."""

    loss_sum: float = 0.0
    examples: int = 0
    passes: int = 0
    padded_tokens: int = 0


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion,
    batch: Batch,
    *,
    cfg: TrainingConfig,
    device: torch.device,
    private: bool,
    autocast: bool = False,
    step: int = 1,
) -> StepStats:
    """One optimizer step on one non-empty logical batch, run as micro-batches (see :func:`micro_batches`).

    Under DP each micro-batch's per-example-clipped gradients are summed by Opacus's virtual steps
    (``signal_skip_step``, as its BatchMemoryManager does: hooks add into ``p.summed_grad`` in
    ``clip_and_accumulate``; ghost and book-keeping in ``accumulate``); the last micro-batch's step adds the
    noise once, divides by the expected batch size (the loss reduction "mean": every mode first undoes the
    micro-batch's own mean, so its per-example gradients do not depend on how the batch is cut) and is
    accounted once. Without DP the micro-batch losses are weighted by their share of the batch, so the
    summed gradient is the batch mean's, as in one pass. A non-finite loss raises :class:`TrainingDiverged`
    (``step``: this step's 1-based number in the round) before its gradient is taken.
    """
    pieces = micro_batches(batch, cfg)
    total = len(batch[2])
    stats = StepStats()
    optimizer.zero_grad(set_to_none=True)
    for number, (input_ids, attention_mask, labels) in enumerate(pieces):
        last = number == len(pieces) - 1
        if private and not last:
            optimizer.signal_skip_step(do_skip=True)  # clip and accumulate only: no noise, no step, no accounting
        input_ids = input_ids.to(device, non_blocking=True)
        attention_mask = attention_mask.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = criterion(logits.float(), labels)
        loss_value = _finite_loss(loss, step)
        if private or len(pieces) == 1:
            loss.backward()
        else:
            (loss * (len(labels) / total)).backward()  # p.grad sums over micro-batches: the batch mean's gradient
        if private and not last:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # per-sample state only: the clipped sum is kept
        stats.loss_sum += loss_value * len(labels)
        stats.examples += len(labels)
        stats.passes += 1
        stats.padded_tokens += input_ids.numel()
    _optimizer_step(optimizer, step)
    return stats


def train_locally(
    model: torch.nn.Module,
    data: TokenizedTexts,
    *,
    cfg: TrainingConfig,
    pad_token_id: int,
    device: torch.device,
    privacy: NodePrivacy | None,
    grad_sample_mode: str = "auto",
    proximal_mu: float = 0.0,
    seed: int = 0,
    canaries: DiracCanaries | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs over ``data``.

    ``progress(steps done, steps planned, examples seen)`` after every step (client/progress.py).

    ``canaries`` (the audited organisation of a simulation's gradient canary audit only): the included ones are
    Poisson-sampled at each step and added to the clipped gradient sum before the noise (privacy/gradient_canaries.py).
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    # Under DP the batches are Poisson samples whose secrecy the privacy amplification relies on: drawn from
    # an unpredictable seed, never from the run's public seed (which the coordinator and every node know).
    generator = torch.Generator().manual_seed(seed if privacy is None else secrets.randbits(63))
    if privacy is None:
        # Non-private baselines are reproducible (dropout included). Never under DP: Opacus draws its
        # noise from the global generator, and a known seed would make the noise predictable.
        torch.manual_seed(seed)
    loader = DataLoader(
        data,
        batch_size=cfg.batch_size,
        shuffle=privacy is None,
        collate_fn=PadCollator(pad_token_id),
        generator=generator,
        pin_memory=device.type == "cuda",
        num_workers=loader_workers(device),
        persistent_workers=loader_workers(device) > 0,
    )
    autocast = use_bf16(cfg.precision, device)
    optimizer = _optimizer(params, cfg)
    criterion = torch.nn.CrossEntropyLoss()
    clipping_mode = None
    if privacy is not None:
        grad_sample_mode = clipping_mode = choose_clipping_mode(model, grad_sample_mode)
        if grad_sample_mode == "ghost":
            model, optimizer, criterion, loader = privacy.make_private(
                model, optimizer, loader, grad_sample_mode="ghost", criterion=criterion
            )
        else:
            model, optimizer, loader = privacy.make_private(model, optimizer, loader, grad_sample_mode=grad_sample_mode)
        if abs(loader.sample_rate - privacy.plan.sample_rate) > 1e-12:
            raise RuntimeError(
                f"data loader sample rate {loader.sample_rate} differs from the calibrated {privacy.plan.sample_rate}"
            )
    if canaries is not None:
        _attach_canaries(canaries, optimizer, params, cfg=cfg, privacy=privacy, examples=len(data), seed=seed)

    total = StepStats()
    steps = 0
    planned = len(loader) * cfg.local_epochs  # Poisson sampling: the expected batches per epoch, which it runs
    for _ in range(cfg.local_epochs):
        for batch in loader:
            if batch[0].shape[0] == 0:
                _noise_only_step(optimizer, params, steps + 1)
                steps += 1
                if progress is not None:
                    progress(steps, planned, total.examples)
                continue
            stats = train_step(
                model, optimizer, criterion, batch, cfg=cfg, device=device, private=privacy is not None,
                autocast=autocast, step=steps + 1,
            )  # fmt: skip
            if anchors:  # once per logical batch, after its one optimizer step
                _proximal_step(params, anchors, cfg.learning_rate, proximal_mu)
            steps += 1
            total.loss_sum += stats.loss_sum
            total.examples += stats.examples
            total.passes += stats.passes
            total.padded_tokens += stats.padded_tokens
            if progress is not None:
                progress(steps, planned, total.examples)
    optimizer.zero_grad(set_to_none=True)
    if isinstance(model, BookkeepingClipping):
        model.remove_hooks()
    return TrainResult(
        mean_loss=total.loss_sum / max(total.examples, 1), steps=steps, examples_seen=total.examples,
        clipping_mode=clipping_mode, micro_batches=total.passes, padded_tokens=total.padded_tokens,
    )  # fmt: skip
