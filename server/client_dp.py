"""Organisation-level DP: Flower's server-side DP wrappers, accounted round by round in the coordinator's ledger.

Each node's DP-SGD protects single examples of its data. With ``client_dp``
the coordinator also clips each organisation's whole update and adds Gaussian
noise to their (unweighted) average with Flower's
``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``, so that one
organisation's entire contribution is protected. The accounting is ours and
conservative: the Gaussian mechanism composed over the rounds with RDP, no
amplification by sampling claimed, and when fewer organisations answer than
the noise was sized for, the lower effective noise multiplier is what gets
recorded. Each round is a signed entry of ``ledgers/coordinator.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedpriv.config import ClientDPConfig
from privacy.ledger import NodeLedger, ensure_signing_key, public_key_text
from privacy.recompute import rdp_epsilons
from server.ledger_store import KEYS_DIR, LEDGERS_DIR
from shared_models.weights import arrays_digest

COORDINATOR = "coordinator"
PROTECTS = (
    "one organisation's whole contribution to a round (all of its data), against whoever sees the global models;"
    " the per-organisation epsilons protect single training examples against everyone, the coordinator included"
)


def wrap(cfg: ClientDPConfig, inner: Strategy, num_sampled: int) -> Strategy:
    """Flower's server-side DP wrapper around ``inner`` (which must average with equal weights)."""
    if cfg.clipping == "adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            inner,
            noise_multiplier=cfg.noise_multiplier,
            num_sampled_clients=num_sampled,
            initial_clipping_norm=cfg.clipping_norm,
            target_clipped_quantile=cfg.target_clipped_quantile,
            clip_norm_lr=cfg.clip_norm_lr,
            clipped_count_stddev=cfg.clipped_count_stddev or num_sampled / 20,
        )
    return DifferentialPrivacyServerSideFixedClipping(
        inner, noise_multiplier=cfg.noise_multiplier, clipping_norm=cfg.clipping_norm, num_sampled_clients=num_sampled
    )


class ClientDPAccount:
    """The coordinator's organisation-level privacy record for one run."""

    def __init__(self, cfg: ClientDPConfig, run_dir: Path, num_sampled: int, say: Callable[[str], None] = print):
        self.cfg = cfg
        self.num_sampled = num_sampled
        self.say = say
        folder = Path(run_dir) / LEDGERS_DIR
        key = ensure_signing_key(Path(run_dir) / "coordinator-key" / "ledger.key")
        (folder / KEYS_DIR).mkdir(parents=True, exist_ok=True)
        (folder / KEYS_DIR / f"{COORDINATOR}.pub").write_text(public_key_text(key.public_key()), encoding="utf-8")
        self.ledger = NodeLedger.open(folder, COORDINATOR, key, filename=f"{COORDINATOR}.jsonl")

    def _events(self) -> list[tuple[float, float, int]]:
        return [(e["noise_multiplier"], e["sample_rate"], e["local_steps"]) for e in self.ledger.entries]

    def epsilon(self) -> float:
        events = self._events()
        return rdp_epsilons(events, self.cfg.delta)[-1] if events else 0.0

    def epsilon_after_round(self) -> float:
        return rdp_epsilons([*self._events(), (self.cfg.noise_multiplier, 1.0, 1)], self.cfg.delta)[-1]

    def refusal_reason(self) -> str | None:
        """Why the next round may not run (it would pass client_dp.max_epsilon), or None."""
        after = self.epsilon_after_round()
        if after > self.cfg.max_epsilon:
            return (
                f"organisation-level epsilon would reach {after:.4f} after one more round, above"
                f" client_dp.max_epsilon={self.cfg.max_epsilon:g} (spent {self.epsilon():.4f})"
            )
        return None

    def record(self, server_round: int, aggregated: int, arrays: ArrayRecord, clipping_norm: float) -> dict:
        """One round's organisation-level release; fewer answers than planned mean less noise per organisation."""
        sigma = self.cfg.noise_multiplier * min(1.0, aggregated / self.num_sampled)
        events = [*self._events(), (sigma, 1.0, 1)]
        entry = self.ledger.append(
            "client_dp_round",
            server_round,
            {
                "local_steps": 1,
                "sample_rate": 1.0,  # no amplification by sampling claimed
                "noise_multiplier": sigma,
                "max_grad_norm": float(clipping_norm),
                "delta": self.cfg.delta,
                "accountant": "rdp",
                "epsilon": rdp_epsilons(events, self.cfg.delta)[-1],
                "num_examples": aggregated,  # organisations in the average
                "model_digest": arrays_digest(arrays),
                "target_epsilon": self.cfg.max_epsilon,
                "max_epsilon": self.cfg.max_epsilon,
            },
        )
        if sigma < self.cfg.noise_multiplier:
            self.say(
                f"[round {server_round}]  organisation-level DP: {aggregated} of {self.num_sampled} organisations"
                f" answered; recorded at the lower effective noise multiplier {sigma:.3f}"
            )
        return entry

    def summary(self) -> dict:
        return {
            "level": "organisation",
            "clipping": self.cfg.clipping,
            "noise_multiplier": self.cfg.noise_multiplier,
            "delta": self.cfg.delta,
            "epsilon": self.epsilon(),
            "max_epsilon": self.cfg.max_epsilon,
            "rounds": len(self.ledger.entries),
            "organisations_per_round": self.num_sampled,
            "accountant": "rdp (no sampling amplification)",
            "ledger": str(self.ledger.path),
            "protects": PROTECTS,
        }
