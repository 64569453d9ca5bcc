"""One organisation's local training round: DP-SGD through Opacus, or plain SGD for baselines.

The same loop serves simulation and deployment; DP only changes how the model,
optimizer and data loader are wrapped.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from client.tokenized import PadCollator, TokenizedTexts
from fedpriv.config import TrainingConfig
from privacy.accountant_state import NodePrivacy
from privacy.bookkeeping import BookkeepingClipping, choose_clipping_mode


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    examples_seen: int
    clipping_mode: str | None = None  # the per-example clipping used under DP (None: no DP)


def _optimizer(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _noise_only_step(optimizer, params: list[torch.nn.Parameter]) -> None:
    """An empty Poisson batch is still one DP step: zero gradient + noise, and it is accounted."""
    optimizer.zero_grad(set_to_none=True)  # what the previous batch left (Opacus refuses uncleared gradients)
    for param in params:
        param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
        param.grad = torch.zeros_like(param)  # what ghost clipping's optimizer reads
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
) -> TrainResult:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs over ``data``."""
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

    total_loss, examples, steps = 0.0, 0, 0
    for _ in range(cfg.local_epochs):
        for batch in loader:
            if batch[0].shape[0] == 0:
                _noise_only_step(optimizer, params)
                steps += 1
                continue
            input_ids, attention_mask, labels = batch
            input_ids = input_ids.to(device, non_blocking=True)
            attention_mask = attention_mask.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = criterion(logits.float(), labels)
            loss.backward()
            optimizer.step()
            if anchors:
                _proximal_step(params, anchors, cfg.learning_rate, proximal_mu)
            steps += 1
            total_loss += float(loss.detach()) * len(labels)
            examples += len(labels)
    optimizer.zero_grad(set_to_none=True)
    if isinstance(model, BookkeepingClipping):
        model.remove_hooks()
    return TrainResult(
        mean_loss=total_loss / max(examples, 1), steps=steps, examples_seen=examples, clipping_mode=clipping_mode
    )
