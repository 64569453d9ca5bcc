"""Each node's update is checked against the round's global model before it can reach the aggregate.

A node is one organisation's machine: a bug, a damaged file or a hostile
operator can send arrays that are misnamed, misshaped, of another dtype, not
finite, or far from anything local training produces. Flower's strategies
average whatever arrives; one NaN spoils the global model for everyone. The
checks here run on the coordinator, on the plain (non-SecAgg+) path, for every
reply before the strategy sees it; a failed check names the reason, and the
strategy aggregates the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedpriv.kernel import protocol


@dataclass(frozen=True)
class Rejection:
    round: int
    node_id: int
    org: str | None
    reason: str

    def to_dict(self) -> dict:
        return {"round": self.round, "node_id": self.node_id, "org": self.org, "reason": self.reason}


def _listed(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def update_problem(content: RecordDict, global_arrays: ArrayRecord, max_update_norm: float | None) -> str | None:
    """Why this reply's update cannot be aggregated, or None when it can."""
    if protocol.ARRAYS not in content.array_records:
        return f"no '{protocol.ARRAYS}' record in the reply"
    update = content.array_records[protocol.ARRAYS]
    missing, extra = set(global_arrays) - set(update), set(update) - set(global_arrays)
    if missing:
        return f"missing tensor(s) {_listed(missing)}"
    if extra:
        return f"unknown tensor(s) {_listed(extra)}"
    squared = 0.0
    for name, expected in global_arrays.items():
        got = update[name]
        if tuple(got.shape) != tuple(expected.shape):
            return f"tensor {name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"tensor {name}: dtype {got.dtype}, expected {expected.dtype}"
        try:
            values = got.numpy()
        except Exception as err:  # undecodable bytes under a well-formed header
            return f"tensor {name}: unreadable ({type(err).__name__})"
        if not np.isfinite(values).all():
            return f"tensor {name}: {int((~np.isfinite(values)).sum())} value(s) not finite (NaN or Inf)"
        if max_update_norm is not None:
            squared += float(np.sum((values.astype(np.float64) - expected.numpy().astype(np.float64)) ** 2))
    if max_update_norm is not None:
        norm = math.sqrt(squared)
        if not norm <= max_update_norm:
            return f"update norm {norm:.4g} exceeds strategy.max_update_norm {max_update_norm:g}"
    return None
