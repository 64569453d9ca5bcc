"""Organisation-level DP (``client_dp``): a fixed-denominator Gaussian mechanism, accounted round by round.

Each node's DP-SGD protects single examples of its data. With ``client_dp``
the coordinator also protects one organisation's entire contribution to a
round. **Neighbouring relation: add or remove one organisation's whole
contribution to a round (all of its data).**

The mechanism (:class:`OrganisationDP`, wrapped around the configured Flower
strategy) is the fixed-denominator estimator of McMahan et al. 2018
("Learning Differentially Private Recurrent Language Models")::

    released = current + sum_i clip(update_i, C) / n + N(0, (z C / n)^2)

where ``n`` (``organisations_planned``) is the number of organisations a
round samples, fixed from the config before round 1, and the sum runs over
the organisations that answered, however many they are. Adding or removing
one organisation moves the pre-noise release by at most ``C / n``, so the
release is the Gaussian mechanism with multiplier ``z`` whatever number
answers (an average over the replies received would move by up to ``2C/n``:
three organisations at +u and one at -u average 0.5u, without the fourth
1.0u). The inner strategy (FedAvg, FedProx, FedAdam) only ever sees the
released aggregate: every reply it aggregates carries it, so what it does
with it (FedAdam's moments) is post-processing. Under *replace-one*
neighbouring the same mechanism has sensitivity ``2C/n``: its epsilon is that
of multiplier ``z/2``.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping") also releases, each round, the count of unclipped updates
(bits centred to -1/2, +1/2: add/remove sensitivity 1/2) with Gaussian noise
of std ``sigma_b`` (``clipped_count_stddev``) over the same fixed
denominator; the clip norm follows ``C *= exp(-lr (noised unclipped fraction
- target))``. The update noise multiplier is raised to ``z_update`` with
``z^-2 = z_update^-2 + (2 sigma_b)^-2``, so that the pair is exactly as
private as one Gaussian mechanism with the configured ``z``; a configuration
where that is impossible (``2 sigma_b <= z``) is refused. Flower's own
``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping`` are not used: both
average over the replies received, and in Flower 1.41 the adaptive one counts
*clipped* bits (sensitivity 1, accounted as 1/2), moves the norm the wrong
way (down when most updates are clipped) and sizes the noise with the norm
updated after clipping.

The accounting: RDP of the Gaussian mechanism with ``z`` composed over the
rounds, no amplification by sampling claimed; each round is a signed entry of
``ledgers/coordinator.jsonl``. Not covered: the training and evaluation
metrics, and the number of organisations that answered (the ledger records
it for the coordinator's audit).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedpriv.kernel import atomic_files
from fedpriv.kernel.config import ClientDPConfig
from fedpriv.privacy.ledger import NodeLedger, ensure_signing_key, public_key_text
from fedpriv.privacy.recompute import rdp_epsilons
from fedpriv.server.ledger_store import KEYS_DIR, LEDGERS_DIR
from fedpriv.shared_models.weights import arrays_digest

log = logging.getLogger("fedpriv.server")

COORDINATOR = "coordinator"
ESTIMATOR = "fixed_denominator"
NEIGHBOURING = "add/remove one organisation"
PROTECTS = (
    "one organisation's whole contribution to a round (all of its data), against whoever sees the global models;"
    " the per-organisation epsilons protect single training examples against everyone, the coordinator included"
)


def wrap(cfg: ClientDPConfig, inner: Strategy, num_sampled: int, rng=None) -> OrganisationDP:
    """``inner`` behind the organisation-level DP release; ``num_sampled``: the organisations planned per round."""
    return OrganisationDP(inner, cfg, num_sampled, rng=rng)


class OrganisationDP(Strategy):
    """The fixed-denominator Gaussian mechanism (fixed or adaptive clipping) in front of a Flower strategy.

    ``clipping_norm`` is the norm the next round clips to (adaptive clipping's state, saved for a resume);
    ``released_clipping_norm`` the one the last release used. ``rng`` draws the noise (``normal(loc, scale,
    size)``); by default a NumPy generator seeded from the operating system, never from the run's seed.
    """

    def __init__(self, strategy: Strategy, cfg: ClientDPConfig, organisations_planned: int, rng=None):
        if organisations_planned < 1:
            raise ValueError(f"organisations_planned must be >= 1, got {organisations_planned}")
        self.strategy = strategy
        self.organisations_planned = int(organisations_planned)
        self.adaptive = cfg.clipping == "adaptive"
        self.noise_multiplier = cfg.noise_multiplier  # what the pair (update, count) achieves: the recorded one
        self.update_noise_multiplier = cfg.update_noise_multiplier(self.organisations_planned)  # ConfigError
        self.clipped_count_stddev = cfg.count_stddev(self.organisations_planned) if self.adaptive else None
        self.target_clipped_quantile = cfg.target_clipped_quantile
        self.clip_norm_lr = cfg.clip_norm_lr
        self.clipping_norm = float(cfg.clipping_norm)
        self.released_clipping_norm: float | None = None
        self.released_organisations = 0  # how many clipped updates the last release summed
        self.current_arrays: ArrayRecord | None = None
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        # FedAvg and FedProx return the (equal-weight) average of the replies, which all carry the release: the
        # release itself is returned, so that no rounding of that average depends on how many answered
        self._returns_release = type(strategy).aggregate_train is FedAvg.aggregate_train

    def __repr__(self) -> str:
        return f"OrganisationDP(fixed-denominator, {'adaptive' if self.adaptive else 'fixed'} clipping)"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.current_arrays is None:
            raise RuntimeError("OrganisationDP.aggregate_train before configure_train")
        names = list(self.current_arrays.keys())
        current = {name: np.asarray(self.current_arrays[name].numpy(), dtype=np.float64) for name in names}
        total = {name: np.zeros_like(value) for name, value in current.items()}
        clip = self.clipping_norm
        answered, centred_unclipped = 0, 0.0
        for reply in replies:
            if reply.has_error():
                continue
            update = _update_of(reply, current)
            if update is None:
                log.warning("organisation-level DP: a reply from node %s does not fit the model, left out",
                            reply.metadata.src_node_id)  # fmt: skip
                continue
            norm = math.sqrt(sum(float(np.sum(np.square(u))) for u in update.values()))
            scale = min(1.0, clip / norm) if norm > 0 else 1.0
            for name in names:
                total[name] += update[name] * scale
            answered += 1
            centred_unclipped += 0.5 if norm <= clip else -0.5
        if not answered:  # nothing to release (never the inner strategy's plain average of what came)
            return None, None
        n = self.organisations_planned
        std = self.update_noise_multiplier * clip / n
        sizes = [current[name].size for name in names]
        noise = np.asarray(self.rng.normal(0.0, std, size=sum(sizes)), dtype=np.float64)
        parts = np.split(noise, np.cumsum(sizes)[:-1]) if names else []
        released = ArrayRecord(
            {
                name: Array(np.asarray(current[name] + total[name] / n + part.reshape(current[name].shape)))
                for name, part in zip(names, parts, strict=True)
            }
        )
        self.released_clipping_norm, self.released_organisations = clip, answered
        if self.adaptive:  # Andrew et al. 2021: noised count of unclipped updates, centred, fixed denominator
            count = centred_unclipped + float(self.rng.normal(0.0, self.clipped_count_stddev))
            unclipped_fraction = count / n + 0.5
            self.clipping_norm = clip * math.exp(
                -self.clip_norm_lr * (unclipped_fraction - self.target_clipped_quantile)
            )
        # the inner strategy aggregates the release only (and the replies' metrics)
        for reply in replies:
            if not reply.has_error():
                for key in list(reply.content.array_records):
                    reply.content[key] = released
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        return (released if self._returns_release else arrays), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info(
            "organisation-level DP: fixed-denominator estimator, %d organisations planned, noise multiplier %s"
            " (updates %s), clipping norm %s",
            self.organisations_planned, self.noise_multiplier, self.update_noise_multiplier, self.clipping_norm,
        )  # fmt: skip
        self.strategy.summary()


def _update_of(reply: Message, current: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The reply's weights minus the global ones (float64), or None when its one ArrayRecord does not fit them."""
    records = list(reply.content.array_records.values())
    if len(records) != 1 or set(records[0].keys()) != set(current):
        return None
    update = {}
    for name, base in current.items():
        value = np.asarray(records[0][name].numpy(), dtype=np.float64)
        if value.shape != base.shape or not np.all(np.isfinite(value)):
            return None
        update[name] = value - base
    return update


class ClientDPAccount:
    """The coordinator's organisation-level privacy record for one run."""

    def __init__(self, cfg: ClientDPConfig, run_dir: Path, num_sampled: int, say: Callable[[str], None] = print):
        self.cfg = cfg
        self.num_sampled = num_sampled  # the fixed denominator: organisations planned per round
        self.update_noise_multiplier = cfg.update_noise_multiplier(num_sampled)
        self.say = say
        folder = Path(run_dir) / LEDGERS_DIR
        key = ensure_signing_key(Path(run_dir) / "coordinator-key" / "ledger.key")
        atomic_files.write_text(folder / KEYS_DIR / f"{COORDINATOR}.pub", public_key_text(key.public_key()))
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
        """One round's organisation-level release: the configured multiplier, however many of the planned answered.

        ``aggregated``: the organisations whose clipped updates are in the sum; ``clipping_norm``: the norm they
        were clipped to (adaptive clipping: the round's, not the next one's)."""
        sigma = self.cfg.noise_multiplier  # the fixed denominator keeps the sensitivity C/n_planned: no rescaling
        events = [*self._events(), (sigma, 1.0, 1)]
        fields = {
            "local_steps": 1,
            "sample_rate": 1.0,  # no amplification by sampling claimed
            "noise_multiplier": sigma,
            "max_grad_norm": float(clipping_norm),
            "delta": self.cfg.delta,
            "accountant": "rdp",
            "epsilon": rdp_epsilons(events, self.cfg.delta)[-1],
            "num_examples": aggregated,  # organisations in the sum
            "model_digest": arrays_digest(arrays),
            "target_epsilon": self.cfg.max_epsilon,
            "max_epsilon": self.cfg.max_epsilon,
            "estimator": ESTIMATOR,
            "organisations_planned": self.num_sampled,
            "neighbouring": NEIGHBOURING,
            "update_noise_multiplier": self.update_noise_multiplier,
        }
        if self.cfg.clipping == "adaptive":
            fields["clipped_count_stddev"] = self.cfg.count_stddev(self.num_sampled)
        entry = self.ledger.append("client_dp_round", server_round, fields)
        if aggregated < self.num_sampled:
            self.say(
                f"[round {server_round}]  organisation-level DP: {aggregated} of {self.num_sampled} organisations"
                f" answered; their clipped updates are summed over the planned {self.num_sampled}"
                f" (noise multiplier {sigma:g} unchanged)"
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
            "organisations_planned": self.num_sampled,
            "estimator": ESTIMATOR,
            "neighbouring": NEIGHBOURING,
            "update_noise_multiplier": self.update_noise_multiplier,
            "accountant": "rdp (no sampling amplification)",
            "ledger": str(self.ledger.path),
            "protects": PROTECTS,
        }
