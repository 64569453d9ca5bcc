"""How far the audit's second RDP implementation (dp-accounting) sits from the nodes' (Opacus), and PLD below both.

Both compute the Poisson-subsampled Gaussian's RDP at each order and convert it with the same bound; at
integer orders they agree to the last bits. At fractional orders Opacus sums the series of Mironov et al.
(2019) exactly, with its alternating signs, while dp-accounting bounds it term by term (and leaves out an
order whose series does not converge in 1,000 terms), so its epsilon is the same or a little higher. The
audit's RDP_TOLERANCE must cover this for honest claims. Draws ``cases`` random mechanisms (q = 1/k,
k in [2, 5000]; sigma in [0.4, 5]; whole epochs; 1 to 1,000 rounds) and prints, per range of epsilon, the
largest relative excess of dp-accounting's RDP over Opacus's and the share of cases with any excess.

    python benchmarks/rdp_agreement.py                 # 3,000 cases
    python benchmarks/rdp_agreement.py cases=300 seed=1
"""

from __future__ import annotations

import json
import random
import sys

from benchmark_settings import parse_settings

from fedpriv.privacy import independent
from fedpriv.privacy.recompute import rdp_epsilons

DEFAULTS = {"cases": 3000, "seed": 4}
LIMITS = (5, 10, 20, 30, 50, 100)


def main(argv: list[str]) -> dict:
    args = parse_settings(argv, DEFAULTS)
    rng = random.Random(args["seed"])
    pairs = []
    for _ in range(args["cases"]):
        k = rng.randint(2, 5000)
        sigma = rng.uniform(0.4, 5.0)
        steps = k * rng.randint(1, 4) * rng.choice([1, 2, 3, 5, 10, 20, 100, 1000])
        events = [(sigma, 1 / k, steps)]
        opacus = rdp_epsilons(events, 1e-5)[-1]
        second = independent.rdp_epsilons(events, 1e-5)[-1]
        pairs.append((opacus, (second - opacus) / opacus if opacus > 0 else 0.0))
    result = {"cases": args["cases"], "seed": args["seed"], "by_epsilon": {}}
    for limit in LIMITS:
        within = [excess for opacus, excess in pairs if opacus <= limit]
        result["by_epsilon"][f"<= {limit}"] = {
            "cases": len(within),
            "max_relative_excess": round(max(within, default=0.0), 6),
            "share_with_excess": round(sum(e > 1e-9 for e in within) / max(1, len(within)), 3),
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
