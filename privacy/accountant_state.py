"""One organisation's DP state on disk: its fixed plan and its accountant, never reset.

``state_dir/privacy_plan.json`` holds the plan calibrated at the first start;
``state_dir/accountant.json`` holds Opacus's accountant history. A restarted
node reopens both and keeps counting from where it stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedpriv.kernel import atomic_files
from fedpriv.kernel.errors import PrivacyError
from fedpriv.privacy import rdp_steps
from fedpriv.privacy.calibration import PrivacyPlan

PLAN_FILE = "privacy_plan.json"
ACCOUNTANT_FILE = "accountant.json"
RDP_FILE = "rdp_per_step.json"  # a cache of the plan's one-step RDP (privacy/rdp_steps.py)

# Plan fields that define the guarantee; a reopened node must not change them.
_FIXED_FIELDS = ("target_epsilon", "delta", "accountant", "sample_rate")


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_files.write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrivacyError(f"privacy state {path}: cannot be read ({exc.__class__.__name__})") from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


class NodePrivacy:
    """One organisation's calibrated plan + accountant. Loaded from / saved to state_dir so a restarted node continues."""

    def __init__(self, state_dir: Path, plan: PrivacyPlan, accountant) -> None:
        self.state_dir = Path(state_dir)
        self.plan = plan
        self.accountant = accountant
        self._rdp_ready = False

    @staticmethod
    def has_plan(state_dir: Path) -> bool:
        """Whether ``state_dir`` already holds the organisation's plan (then ``open`` needs no calibrated one)."""
        return (Path(state_dir) / PLAN_FILE).exists()

    @classmethod
    def open(cls, state_dir: Path, plan: PrivacyPlan) -> NodePrivacy:
        """Reuse the stored plan and accountant in ``state_dir`` if any, else start from ``plan``."""
        from opacus.accountants import create_accountant

        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        plan_path = state_dir / PLAN_FILE
        if plan_path.exists():
            try:
                stored = PrivacyPlan.from_dict(_read_json(plan_path))
            except (TypeError, ValueError, KeyError) as exc:
                raise PrivacyError(f"privacy state {plan_path}: not a valid privacy plan ({exc})") from None
            changed = [f for f in _FIXED_FIELDS if not _same(getattr(stored, f), getattr(plan, f))]
            if changed:
                diffs = ", ".join(f"{f} {getattr(stored, f)!r} -> {getattr(plan, f)!r}" for f in changed)
                raise PrivacyError(
                    f"privacy state {state_dir}: the organisation's privacy plan is fixed for the run"
                    f" (noise calibrated once) but the new configuration changes {diffs};"
                    " restore the original privacy settings or start a new run with a fresh state directory"
                )
            plan = stored
        elif math.isnan(plan.noise_multiplier):
            raise ValueError("NodePrivacy.open: an uncalibrated plan needs a stored plan (see has_plan)")
        else:
            _write_json_atomic(plan_path, plan.to_dict())

        accountant = create_accountant(mechanism=plan.accountant)
        acc_path = state_dir / ACCOUNTANT_FILE
        if acc_path.exists():
            state = _read_json(acc_path)
            try:
                state["history"] = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
                accountant.load_state_dict(state)
            except (TypeError, ValueError, KeyError) as exc:
                raise PrivacyError(
                    f"privacy state {acc_path}: not a valid {plan.accountant} accountant ({exc})"
                ) from None
        return cls(state_dir, plan, accountant)

    @property
    def steps(self) -> int:
        """Total DP steps recorded so far."""
        return sum(int(n) for _, _, n in self.accountant.history)

    def catch_up(self, events: list[tuple[float, float, int]]) -> bool:
        """Adopt the ledger's events when they hold more steps than the accountant (a crash after the ledger
        entry was written but before the accountant was saved): the node never counts less than it recorded."""
        recorded = sum(int(n) for _, _, n in events)
        if recorded <= self.steps:
            return False
        merged: list[tuple[float, float, int]] = []
        for sigma, q, n in events:
            if merged and merged[-1][0] == sigma and merged[-1][1] == q:
                merged[-1] = (sigma, q, merged[-1][2] + int(n))
            elif int(n) > 0:
                merged.append((float(sigma), float(q), int(n)))
        self.accountant.history = merged
        self.save()
        return True

    def _history_epsilon(self, history: list[tuple[float, float, int]]) -> float:
        if not history:
            return 0.0
        if self.plan.accountant == "rdp":  # Opacus's numbers, one step's RDP computed once (privacy/rdp_steps.py)
            self._load_rdp_per_step()
            return rdp_steps.epsilon(history, self.plan.delta)
        from opacus.accountants import create_accountant

        probe = create_accountant(mechanism=self.plan.accountant)  # Opacus's own search (PRV), on a copy
        probe.history = list(history)
        return float(probe.get_epsilon(delta=self.plan.delta))

    def _load_rdp_per_step(self) -> None:
        """Reuse the plan's one-step RDP vector from the state folder, or compute and store it (0.4 s of CPU).

        Its integer orders (a fortieth of the cost) are recomputed on load: a damaged file is recomputed.
        """
        if self._rdp_ready:
            return
        sigma, q = self.plan.noise_multiplier, self.plan.sample_rate
        path = self.state_dir / RDP_FILE
        stored = None
        if path.exists():
            try:
                data = _read_json(path)
                if (data["noise_multiplier"], data["sample_rate"]) == (sigma, q) and rdp_steps.agrees(
                    sigma, q, data["orders"], data["rdp"]
                ):
                    stored = data["rdp"]
            except (PrivacyError, TypeError, ValueError, KeyError):
                stored = None
        if stored is not None:
            rdp_steps.remember(sigma, q, stored)
        else:
            values = rdp_steps.per_step(sigma, q)
            data = {"noise_multiplier": sigma, "sample_rate": q, "orders": list(rdp_steps.orders())}
            _write_json_atomic(path, {**data, "rdp": [float(v) for v in values]})
        self._rdp_ready = True

    def epsilon(self) -> float:
        """Epsilon spent so far (0.0 before the first step)."""
        return self._history_epsilon(self.accountant.history)

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon after ``extra_steps`` more steps at the plan's (sigma, q); the accountant is not touched."""
        history = [tuple(h) for h in self.accountant.history]
        if extra_steps > 0:
            sigma, q = self.plan.noise_multiplier, self.plan.sample_rate
            # Merge like Opacus's step() does, so the result equals recording the steps one by one.
            if history and history[-1][0] == sigma and history[-1][1] == q:
                history[-1] = (sigma, q, history[-1][2] + int(extra_steps))
            else:
                history.append((sigma, q, int(extra_steps)))
        return self._history_epsilon(history)

    def make_private(
        self,
        module,
        optimizer,
        data_loader,
        *,
        grad_sample_mode: str = "hooks",
        criterion=None,
        loss_reduction: str = "mean",
    ):
        """Wrap with Opacus, recording every step into THIS accountant.

        Returns (module, optimizer, data_loader), or (module, optimizer, criterion, data_loader)
        for ``grad_sample_mode="ghost"``, as Opacus does. ``"bk"`` is this project's book-keeping
        clipping (privacy/bookkeeping.py): one backward pass, same loader, noise and accounting.
        """
        from opacus import PrivacyEngine

        # Opacus records q = 1 / len(DPDataLoader) with len(DPDataLoader) = int(1 / (1 / len(data_loader))).
        recorded_rate = 1 / int(1 / (1 / len(data_loader)))
        if recorded_rate != self.plan.sample_rate:
            raise PrivacyError(
                f"privacy state {self.state_dir}: the data loader has {len(data_loader)} batches per epoch"
                f" (sampling rate {recorded_rate:.4g}) but the privacy plan was calibrated for sampling rate"
                f" {self.plan.sample_rate:.4g} ({self.plan.num_examples} examples): use the planned batch size"
            )
        if grad_sample_mode == "bk":
            return self._make_private_bookkeeping(module, optimizer, data_loader, loss_reduction)
        engine = PrivacyEngine(accountant=self.plan.accountant)
        engine.accountant = self.accountant
        extra = {} if criterion is None else {"criterion": criterion}
        return engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=grad_sample_mode,
            loss_reduction=loss_reduction,
            **extra,
        )

    def _make_private_bookkeeping(self, module, optimizer, data_loader, loss_reduction: str):
        """Book-keeping clipping (privacy/bookkeeping.py) with Opacus's Poisson loader, noise and accounting."""
        from opacus.data_loader import DPDataLoader

        from fedpriv.privacy.bookkeeping import BookkeepingClipping, bookkeeping_optimizer

        clipping = BookkeepingClipping(module, max_grad_norm=self.plan.max_grad_norm, loss_reduction=loss_reduction)
        loader = DPDataLoader.from_data_loader(data_loader)
        sample_rate = 1 / len(loader)
        dp_optimizer = bookkeeping_optimizer(
            optimizer,
            clipping=clipping,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm,
            expected_batch_size=int(len(data_loader.dataset) * sample_rate),
            loss_reduction=loss_reduction,
        )
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        return clipping, dp_optimizer, loader

    def save(self) -> None:
        """Persist the accountant history atomically."""
        state = self.accountant.state_dict()
        data = {
            "mechanism": state["mechanism"],
            "history": [[float(s), float(q), int(n)] for s, q, n in state["history"]],
        }
        _write_json_atomic(self.state_dir / ACCOUNTANT_FILE, data)

    def report(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "epsilon": self.epsilon(),
            "delta": plan.delta,
            "target_epsilon": plan.target_epsilon,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "steps": self.steps,
            "planned_steps": plan.planned_steps,  # what the noise was calibrated for (all rounds, as configured)
            "accountant": plan.accountant,
            "max_grad_norm": plan.max_grad_norm,
        }
