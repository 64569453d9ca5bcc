"""Gradient-space canaries for the one-run audit in the white-box setting (Steinke, Nasr and Jagielski 2023).

A Dirac canary is one coordinate of the flattened trainable parameters with a
random sign: as a gradient it is ``sign * C * e_j``, of norm exactly the clip
norm C, so per-example clipping leaves it as it is. Each of the m canaries is
included with probability 1/2 (a fair coin per canary, drawn once from the
audit's seed). During the audited organisation's local training, each included
canary is Poisson-sampled at every step with the same rate q as the real
examples, and when sampled it is added to that step's sum of clipped
per-example gradients *before* the noise: for DP-SGD it is exactly one more
example (clipped to C, summed, noised with everything else, divided by the
same expected batch size), so (epsilon, delta) covers it like any example.

The hook is Opacus's public ``DPOptimizer.add_noise``: it reads ``p.summed_grad``
(the clipped sum, in every clipping mode: hooks, ghost and this project's
book-keeping) and writes the noised gradient. The instance's ``add_noise`` is
wrapped so that the sampled canaries are added to ``p.summed_grad`` first; at
start-up the wrapper checks that the optimizer is a DPOptimizer over exactly
the canaries' parameters and that its ``add_noise`` still reads
``summed_grad`` (an Opacus release that adds noise elsewhere fails loudly
rather than auditing nothing). Without DP (baselines), a plain optimizer's step
pre-hook adds each sampled canary as one more example of the batch mean
(``sign * C / batch_size``).

After training a canary is scored by how far its coordinate moved against its
direction (gradient descent moves a coordinate opposite to its gradient): the
score is ``-sign * (final - initial)[j]``, higher for canaries that were in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch


class CanaryHookError(RuntimeError):
    """The gradient canaries cannot be attached as the audit requires."""


@dataclass(frozen=True)
class DiracCanaries:
    coordinates: np.ndarray  # (m,) distinct flat indices into the trainable parameters, in parameter order
    signs: np.ndarray  # (m,) +1.0 or -1.0
    included: list[bool]  # the fair coins, drawn once before training
    num_coordinates: int  # how many trainable coordinates the indices refer to
    norm: float  # the canary gradient's norm: the clip norm C

    @property
    def count(self) -> int:
        return len(self.included)


def make_dirac_canaries(count: int, num_coordinates: int, seed: int, norm: float) -> DiracCanaries:
    """``count`` distinct coordinates of ``num_coordinates`` drawn at random, random signs, fair inclusion coins.

    At random: in a model fine-tuned in full, most coordinates lie in the embedding rows of tokens that the
    organisation's data never uses, which its real gradients do not touch.
    """
    if count > num_coordinates:
        raise ValueError(
            f"{count} gradient canaries need as many trainable coordinates; the model has {num_coordinates}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 26]))
    coordinates = np.sort(rng.choice(num_coordinates, size=count, replace=False)).astype(np.int64)
    signs = rng.choice(np.array([-1.0, 1.0]), size=count)
    included = (rng.random(count) < 0.5).tolist()
    return DiracCanaries(coordinates, signs, included, num_coordinates, float(norm))


class CanaryInjector:
    """Adds the included canaries that each step Poisson-samples (rate ``sample_rate``) to that step's gradients."""

    def __init__(
        self,
        canaries: DiracCanaries,
        params: list[torch.nn.Parameter],
        *,
        norm: float,
        sample_rate: float,
        generator: torch.Generator,
    ) -> None:
        total = sum(p.numel() for p in params)
        if total != canaries.num_coordinates:
            raise CanaryHookError(
                f"the canaries were drawn for {canaries.num_coordinates} trainable coordinates; the model being"
                f" trained has {total}"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise CanaryHookError(f"sample rate {sample_rate} is not in (0, 1]")
        self.params = list(params)
        self.sample_rate = float(sample_rate)
        self.generator = generator
        included = np.flatnonzero(np.asarray(canaries.included, dtype=bool))
        coordinates = torch.from_numpy(canaries.coordinates[included])
        values = torch.from_numpy(canaries.signs[included] * norm)
        self.num_included = len(included)
        # per parameter: (positions among the included canaries, offsets inside the parameter, signed values)
        self._per_param: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        start = 0
        for p in self.params:
            inside = torch.nonzero((coordinates >= start) & (coordinates < start + p.numel())).flatten()
            self._per_param.append((inside, coordinates[inside] - start, values[inside]))
            start += p.numel()
        self.steps = 0
        self.added = 0  # canary gradients added in all (a check that the hook ran)

    def add(self, tensors: list[torch.Tensor], scale: float = 1.0) -> None:
        """One step: sample each included canary with probability q, add the sampled ones (times ``scale``)."""
        sampled = torch.rand(self.num_included, generator=self.generator) < self.sample_rate
        for tensor, (inside, offsets, values) in zip(tensors, self._per_param, strict=True):
            chosen = sampled[inside]
            if not bool(chosen.any()):
                continue
            flat = tensor.view(-1)
            flat.index_add_(0, offsets[chosen].to(flat.device), (values[chosen] * scale).to(flat))
            self.added += int(chosen.sum())
        self.steps += 1


def _check_opacus_contract(optimizer) -> None:
    from opacus.optimizers import DPOptimizer

    if not isinstance(optimizer, DPOptimizer):
        raise CanaryHookError(f"gradient canaries under DP need an Opacus DPOptimizer, got {type(optimizer).__name__}")
    if "add_noise" in vars(optimizer):
        raise CanaryHookError("the optimizer's add_noise is already wrapped (canaries attached twice?)")
    try:
        source = inspect.getsource(type(optimizer).add_noise)
    except (OSError, TypeError):
        source = ""
    if "summed_grad" not in source:
        raise CanaryHookError(
            f"{type(optimizer).__name__}.add_noise no longer reads p.summed_grad (Opacus changed): canaries added"
            " there would not be noised as examples are; the audit refuses to run"
        )


def attach_to_dp_optimizer(optimizer, injector: CanaryInjector) -> None:
    """Wrap ``optimizer.add_noise``: sampled canaries go into ``p.summed_grad`` (the clipped sum), then Opacus noises.

    ``add_noise`` runs once per logical step (not for the skipped micro-batch steps), empty Poisson batches
    included, so each canary is sampled once per accounted step, as an example is.
    """
    _check_opacus_contract(optimizer)
    if [id(p) for p in optimizer.params] != [id(p) for p in injector.params]:
        raise CanaryHookError("the DPOptimizer's parameters are not the ones the canaries were drawn for")
    original = optimizer.add_noise

    def add_noise_with_canaries() -> None:
        sums = []
        for p in optimizer.params:
            if p.summed_grad is None or p.summed_grad.shape != p.shape:
                raise CanaryHookError("Opacus left no clipped sum (p.summed_grad) to add the canaries to")
            sums.append(p.summed_grad)
        injector.add(sums)
        original()

    optimizer.add_noise = add_noise_with_canaries


def attach_to_plain_optimizer(optimizer: torch.optim.Optimizer, injector: CanaryInjector, batch_size: int):
    """Without DP: before each step, each sampled canary is one more example of the batch mean (``/ batch_size``)."""

    def before_step(_optimizer, _args, _kwargs) -> None:
        for p in injector.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        injector.add([p.grad for p in injector.params], scale=1.0 / batch_size)

    return optimizer.register_step_pre_hook(before_step)


def flat_trainable(model: torch.nn.Module) -> torch.Tensor:
    """The trainable parameters as one float64 vector, in ``model.parameters()`` order (the canaries' indexing)."""
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters() if p.requires_grad])


def dirac_scores(initial: torch.Tensor, final: torch.Tensor, canaries: DiracCanaries) -> list[float]:
    """How far each canary's coordinate moved against its direction from ``initial`` to ``final`` (flat vectors)."""
    if initial.numel() != canaries.num_coordinates or final.numel() != canaries.num_coordinates:
        raise ValueError("the model's trainable coordinates differ from those the canaries were drawn for")
    index = torch.from_numpy(canaries.coordinates)
    moved = (final.double() - initial.double())[index]
    return (-torch.from_numpy(canaries.signs) * moved).tolist()
