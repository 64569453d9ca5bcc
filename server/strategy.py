"""Pick one of Flower's own strategies from config; fedpriv only supplies metric aggregation."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from fedpriv.kernel import protocol
from fedpriv.kernel.config import StrategyConfig
from fedpriv.server.round_tracker import RoundTracker


def build_strategy(
    cfg: StrategyConfig, tracker: RoundTracker, num_nodes: int, weighted_by_key: str = protocol.NUM_EXAMPLES
) -> Strategy:
    """The configured Flower strategy (robust ones included), waiting for ``num_nodes`` nodes before round 1.

    ``weighted_by_key=protocol.UNIT_WEIGHT`` averages organisations equally (what organisation-level DP needs).
    """
    common = dict(
        weighted_by_key=weighted_by_key,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=min(cfg.min_train_nodes, num_nodes),
        min_evaluate_nodes=min(cfg.min_evaluate_nodes, num_nodes),
        min_available_nodes=num_nodes,
        train_metrics_aggr_fn=tracker.aggregate_train,
        evaluate_metrics_aggr_fn=tracker.aggregate_evaluate,
    )
    if cfg.name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=cfg.trim_fraction, **common)
    if cfg.name == "fedmedian":
        return FedMedian(**common)
    if cfg.name == "krum":
        return Krum(num_malicious_nodes=cfg.num_malicious_nodes, **common)
    return select_strategy(cfg, FedAvg, FedProx, FedAdam, **common)


def select_strategy(cfg: StrategyConfig, fedavg: type, fedprox: type, fedadam: type, **common: Any):
    """The configured strategy from one family of Flower's classes (Message-API, or legacy for SecAgg+)."""
    if cfg.name == "fedprox":
        return fedprox(proximal_mu=cfg.proximal_mu, **common)
    if cfg.name == "fedadam":
        opt = cfg.fedadam
        return fedadam(eta=opt.eta, eta_l=opt.eta_l, beta_1=opt.beta_1, beta_2=opt.beta_2, tau=opt.tau, **common)
    return fedavg(**common)
