"""Pre-flight with many organisations: noise is calibrated once per distinct plan, not once per organisation."""

from __future__ import annotations

import fedpriv.privacy.org_plan
from fedpriv.kernel.config import load_config
from fedpriv.simulations.runner import preflight


def test_preflight_calibrates_each_distinct_plan_once(monkeypatch):
    calls = []
    calibrate = fedpriv.privacy.org_plan.org_privacy_plan

    def counted(cfg, org, num_train, *args, **kwargs):
        calls.append((org, num_train))
        return calibrate(cfg, org, num_train, *args, **{**kwargs, "calibrate": False})  # the count is the point

    monkeypatch.setattr(fedpriv.privacy.org_plan, "org_privacy_plan", counted)
    cfg = load_config(
        overrides=[
            "model.name=tiny",
            "partitioning.scheme=iid",
            "partitioning.num_orgs=300",
            "data.max_examples=1850",  # 6 or 7 articles each: two training-set sizes
            "training.batch_size=4",
            "privacy.orgs={org-7: {target_epsilon: 3}}",
        ]
    )
    plan = preflight(cfg)
    sizes = {len(org.train) for org in plan.partitions.orgs if org.name != "org-7"}
    assert len(plan.privacy) == 300 and len(sizes) == 2
    assert len(calls) == 3  # the two sizes at the run's target, and org-7's own target
    for org in plan.partitions.orgs:
        p = plan.privacy[org.name]
        assert p.num_examples == len(org.train) and p.target_epsilon == (3.0 if org.name == "org-7" else 8.0)
    # organisations with the same plan share one object: 300 entries cost no more memory than 3
    assert len({id(p) for p in plan.privacy.values()}) == 3
