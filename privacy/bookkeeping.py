"""Book-keeping clipping: per-example clipped gradients from ONE backward pass that skips weight gradients.

Opacus's modes pay for DP twice: "hooks" materialises every example's gradient
(memory B x parameters), "ghost" runs a second backward pass to get the clipped
sum. Book-keeping (Bu, Wang, Zha and Karypis 2023, "Differentially private
optimization on large model at small cost") keeps what the one backward pass
already computes for each trainable layer, its input activations ``a`` and the
gradient ``g`` of the loss at its output, and derives both things DP-SGD needs
from them:

- each example's gradient norm: for a linear layer over T tokens,
  ``||g_i^T a_i||^2 = <a_i a_i^T, g_i g_i^T>`` (the "ghost norm", T x T) or the
  example's gradient itself when that is smaller (T^2 > d_in d_out: mixed ghost
  clipping); embeddings compare token ids, layer norms are per-example already;
- the clipped sum ``sum_i c_i g_i^T a_i = (c * g)^T a``: one matrix product per
  layer, the one a non-private backward pass would have spent on the weight
  gradient, which this backward pass skips (trainable weights are taken out of
  the autograd graph during the forward pass; only activations' gradients flow).

The result goes into ``p.grad`` as the SUM of clipped per-example gradients;
:func:`bookkeeping_optimizer` (Opacus's fast-gradient-clipping optimizer)
adds the noise, averages and calls the accountant, exactly as for Opacus's
ghost mode. Layers: ``nn.Linear`` (including LoRA's A and B and PEFT's copies of
the head), ``nn.Embedding`` and ``nn.LayerNorm``; a model with any other
trainable layer is refused (:class:`UnsupportedForBookkeeping`) and the caller
falls back to Opacus's hooks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedpriv.kernel.errors import PrivacyError

SUPPORTED_LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm)


class UnsupportedForBookkeeping(PrivacyError):
    """A trainable parameter book-keeping cannot clip per example (a layer type it does not know, shared weights)."""


@dataclass
class _Record:
    """What one trainable layer leaves in the forward and backward pass of the current batch."""

    inputs: torch.Tensor | None = None
    grad_output: torch.Tensor | None = None
    reached: bool = False  # False: the loss does not depend on this layer's output (its gradient is zero)
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, *shape), small layers only


def _trainable_direct(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


class BookkeepingClipping(nn.Module):
    """Wraps a model so that each backward pass leaves the per-example-clipped gradient sum in ``p.grad``.

    ``loss_reduction`` is the training loss's ("mean": the loss is divided by the batch size, so the
    gradients at layer outputs are scaled back up, as Opacus's hooks do).
    """

    def __init__(
        self, module: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean", linear_norms: str = "auto"
    ):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', not {loss_reduction!r}")
        if linear_norms not in ("auto", "ghost", "per_example"):
            raise ValueError(f"linear_norms must be auto, ghost or per_example, not {linear_norms!r}")
        self.linear_norms = linear_norms  # auto: whichever of the two costs less for the layer's shape
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.layers: dict[nn.Module, dict[str, nn.Parameter]] = {}
        owned: set[int] = set()
        for name, layer in module.named_modules():
            params = _trainable_direct(layer)
            if not params:
                continue
            if not isinstance(layer, SUPPORTED_LAYERS):
                raise UnsupportedForBookkeeping(
                    f"{name or 'model'} ({type(layer).__name__}) has trainable parameters; book-keeping clipping"
                    f" handles {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}"
                )
            self.layers[layer] = params
            owned |= {id(p) for p in params.values()}
        stray = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owned]
        if stray:
            raise UnsupportedForBookkeeping(f"trainable parameters outside a supported layer: {', '.join(stray[:5])}")
        if not self.layers:
            raise UnsupportedForBookkeeping("the model has no trainable parameters")
        self.params = [p for params in self.layers.values() for p in params.values()]
        self._records: dict[nn.Module, _Record] = {}
        self._norms_sq: torch.Tensor | None = None
        self._batch_size = 0
        self._handles = [layer.register_forward_hook(self._forward_hook) for layer in self.layers]

    # ------------------------------------------------------------------ forward / backward

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._module(*args, **kwargs)
        self._records = {}
        self._norms_sq = None
        # Weights leave the graph for this forward pass: backward computes activations' gradients only.
        for p in self.params:
            p.requires_grad_(False)
        try:
            return self._module(*args, **kwargs)
        finally:
            for p in self.params:
                p.requires_grad_(True)

    def _forward_hook(self, layer: nn.Module, inputs, output):
        if not torch.is_grad_enabled():
            return None
        if layer in self._records:
            raise UnsupportedForBookkeeping(
                f"{type(layer).__name__} was called twice in one forward pass (shared weights): use hooks"
            )
        record = _Record(inputs=inputs[0].detach())
        self._records[layer] = record
        if not output.requires_grad:  # nothing below needs a gradient: start the graph here
            output = output.detach().requires_grad_(True)
        output.register_hook(lambda grad, layer=layer: self._backward(layer, grad))
        return output

    def _backward(self, layer: nn.Module, grad_output: torch.Tensor) -> None:
        record = self._records[layer]
        record.reached = True
        a, g = record.inputs, grad_output.detach()
        if g.dtype in (torch.float16, torch.bfloat16):  # mixed precision: norms and sums in float32
            g = g.float()
            a = a.float() if a.is_floating_point() else a
        batch = g.shape[0]
        if self.loss_reduction == "mean":
            g = g * batch
        if self._norms_sq is None:
            self._norms_sq = torch.zeros(batch, device=g.device, dtype=torch.float32)
            self._batch_size = batch
        params = self.layers[layer]
        if isinstance(layer, nn.Linear):
            self._norms_sq += self._linear(record, params, a, g)
        elif isinstance(layer, nn.Embedding):
            self._norms_sq += self._embedding(layer, record, a, g)
        else:
            self._norms_sq += self._layer_norm(layer, record, params, a, g)

    def _linear(
        self, record: _Record, params: dict[str, nn.Parameter], a: torch.Tensor, g: torch.Tensor
    ) -> torch.Tensor:
        a = a.reshape(a.shape[0], -1, a.shape[-1]).to(g.dtype)  # (B, T, d_in); T = 1 for (B, d_in) inputs
        g = g.reshape(g.shape[0], -1, g.shape[-1])  # (B, T, d_out)
        tokens, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        norms = torch.zeros(g.shape[0], device=g.device, dtype=torch.float32)
        if "weight" in params:
            if tokens == 1:  # rank one: ||g a^T||^2 = ||g||^2 ||a||^2
                norms += (g.square().sum((1, 2)) * a.square().sum((1, 2))).float()
                record.inputs, record.grad_output = a, g
            elif self._ghost(tokens, d_in, d_out):  # ghost norm: two T x T Gram matrices
                norms += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)).float()
                record.inputs, record.grad_output = a, g
            else:  # the example's gradient is smaller than its Gram matrices: form it
                per_example = torch.bmm(g.transpose(1, 2), a)  # (B, d_out, d_in)
                norms += per_example.square().sum((1, 2)).float()
                record.per_example["weight"] = per_example
                record.inputs = None
        if "bias" in params:
            per_example = g.sum(1)
            norms += per_example.square().sum(1).float()
            record.per_example["bias"] = per_example
        return norms

    def _ghost(self, tokens: int, d_in: int, d_out: int) -> bool:
        if self.linear_norms != "auto":
            return self.linear_norms == "ghost"
        return tokens * (d_in + d_out) < d_in * d_out  # Gram matrices' cost against the example's gradient's

    @staticmethod
    def _embedding(layer: nn.Embedding, record: _Record, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if layer.padding_idx is not None:  # the padding row gets no gradient
            g = g * (ids != layer.padding_idx).unsqueeze(-1).to(g.dtype)
        same_token = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)  # (B, T, T)
        record.inputs, record.grad_output = ids, g
        return (torch.bmm(g, g.transpose(1, 2)) * same_token).sum((1, 2)).float()

    @staticmethod
    def _layer_norm(
        layer: nn.LayerNorm, record: _Record, params: dict[str, nn.Parameter], x: torch.Tensor, g: torch.Tensor
    ) -> torch.Tensor:
        dims = tuple(range(1, x.dim() - len(layer.normalized_shape)))
        norms = torch.zeros(g.shape[0], device=g.device, dtype=torch.float32)
        if "weight" in params:
            normalized = F.layer_norm(x.to(g.dtype), layer.normalized_shape, eps=layer.eps)
            per_example = (g * normalized).sum(dims) if dims else g * normalized
            record.per_example["weight"] = per_example
            norms += per_example.reshape(g.shape[0], -1).square().sum(1).float()
        if "bias" in params:
            per_example = g.sum(dims) if dims else g
            record.per_example["bias"] = per_example
            norms += per_example.reshape(g.shape[0], -1).square().sum(1).float()
        record.inputs = None
        return norms

    # ------------------------------------------------------------------ after backward

    def per_example_norms(self) -> torch.Tensor:
        """(B,) gradient norm of each example of the last batch, over every trainable parameter."""
        if self._norms_sq is None:
            raise RuntimeError("no backward pass since the last forward pass")
        return self._norms_sq.sqrt()

    def clip_factors(self) -> torch.Tensor:
        """min(1, C / (norm + 1e-6)): Opacus's clipping factor."""
        return (self.max_grad_norm / (self.per_example_norms() + 1e-6)).clamp(max=1.0)

    def write_clipped_sum(self) -> bool:
        """Set every trainable ``p.grad`` to the sum of the batch's clipped per-example gradients.

        Returns False (grads left as they are) when no batch went through since the last call.
        """
        if self._norms_sq is None:
            return False
        missing = [type(layer).__name__ for layer in self.layers if layer not in self._records]
        if missing:
            raise RuntimeError(f"trainable layers not used in the forward pass: {', '.join(missing)}")
        factors = self.clip_factors()
        for layer, params in self.layers.items():
            record = self._records[layer]
            for name, p in params.items():
                if not record.reached:
                    value = torch.zeros_like(p)
                elif name in record.per_example:
                    value = torch.tensordot(factors.to(record.per_example[name].dtype), record.per_example[name], 1)
                elif isinstance(layer, nn.Embedding):
                    g = record.grad_output * factors.to(record.grad_output.dtype)[:, None, None]
                    value = torch.zeros_like(p)
                    value.index_add_(0, record.inputs.reshape(-1), g.reshape(-1, g.shape[-1]).to(p.dtype))
                else:  # linear weight from book-kept activations: (c * g)^T a
                    g = record.grad_output * factors.to(record.grad_output.dtype)[:, None, None]
                    value = torch.einsum("bto,bti->oi", g, record.inputs)
                p.grad = value.to(p.dtype).reshape(p.shape)
        self._records = {}
        self._norms_sq = None
        return True

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def unsupported_reason(module: nn.Module) -> str | None:
    """Why book-keeping cannot clip ``module``'s trainable parameters per example (None: it can)."""
    for name, layer in module.named_modules():
        if _trainable_direct(layer) and not isinstance(layer, SUPPORTED_LAYERS):
            return f"{name or 'model'} ({type(layer).__name__}) is trainable"
    owned = {
        id(p) for layer in module.modules() if isinstance(layer, SUPPORTED_LAYERS) for p in layer.parameters(False)
    }
    if not any(p.requires_grad for p in module.parameters()):
        return "nothing is trainable"
    if any(p.requires_grad and id(p) not in owned for p in module.parameters()):
        return "a trainable parameter lies outside a supported layer"
    return None


def choose_clipping_mode(module: nn.Module, configured: str) -> str:
    """The clipping mode a node uses: ``configured``, or for "auto" book-keeping where it applies, else hooks."""
    if configured != "auto":
        return configured
    return "bk" if unsupported_reason(module) is None else "hooks"


@functools.cache
def _optimizer_class():
    """Defined on first use: importing Opacus costs seconds that evaluate-only processes should not pay."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    class BookkeepingDPOptimizer(DPOptimizerFastGradientClipping):
        """Opacus's optimizer for pre-clipped gradient sums, fed by BookkeepingClipping before each step."""

        def __init__(self, optimizer: torch.optim.Optimizer, *, clipping: BookkeepingClipping, **kwargs):
            super().__init__(optimizer, **kwargs)
            self.clipping = clipping

        def pre_step(self, closure=None):
            self.clipping.write_clipped_sum()
            return super().pre_step(closure)

    return BookkeepingDPOptimizer


def bookkeeping_optimizer(optimizer: torch.optim.Optimizer, *, clipping: BookkeepingClipping, **kwargs):
    """Opacus's DPOptimizerFastGradientClipping (noise, averaging, accountant hook) over book-kept clipped sums."""
    return _optimizer_class()(optimizer, clipping=clipping, **kwargs)
