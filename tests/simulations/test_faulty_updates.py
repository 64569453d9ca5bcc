"""A deliberately faulty ClientApp: every malformed update is refused and the global model is the honest one's.

Seven organisations train one round with the real ServerApp; organisation 0 is honest, the other six each
corrupt their reply in one way (NaN, Inf, wrong shape, wrong dtype, huge norm, missing tensor). The round
must aggregate organisation 0's update alone and name the six refusals in summary.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    from flwr.app import Array
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from fedpriv.client.client_app import handle_evaluate, handle_train
    from fedpriv.kernel import protocol
    from fedpriv.kernel.config import load_config
    from fedpriv.server.server_app import build_server_app
    from fedpriv.simulations.runner import backend_config

    out = Path(sys.argv[1])
    cfg = load_config(overrides=[
        "model.name=tiny", "partitioning.num_orgs=7", "partitioning.scheme=iid", "data.max_examples=175",
        "training.batch_size=16", "data.max_length=32", "training.rounds=1", "output.export_model=false",
        "privacy.enabled=false", "strategy.max_update_norm=50", f"run.out_dir={out}",
    ])
    FAULTS = {1: "nan", 2: "inf", 3: "shape", 4: "dtype", 5: "norm", 6: "missing"}
    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = handle_train(cfg, msg, context)
        arrays = reply.content[protocol.ARRAYS]
        pid = int(context.node_config["partition-id"])
        name = sorted(arrays)[0]
        value = arrays[name].numpy()
        fault = FAULTS.get(pid)
        if fault is None:
            np.savez(out / "honest.npz", **{k: a.numpy() for k, a in arrays.items()})
        elif fault == "nan":
            arrays[name] = Array(np.where(np.arange(value.size).reshape(value.shape) == 0, np.nan, value))
        elif fault == "inf":
            arrays[name] = Array(np.full_like(value, np.inf))
        elif fault == "shape":
            arrays[name] = Array(value.reshape(-1)[:-1].copy())
        elif fault == "dtype":
            arrays[name] = Array(value.astype(np.float64))
        elif fault == "norm":
            arrays[name] = Array(value * 1e6)
        elif fault == "missing":
            del arrays[name]
        return reply

    @app.evaluate()
    def evaluate(msg, context):
        return handle_evaluate(cfg, msg, context)

    out.mkdir(parents=True)
    run_simulation(server_app=build_server_app(cfg, out, 7), client_app=app, num_supernodes=7,
                   backend_config=backend_config(cfg, verbose=False))
    """
)


def test_every_malformed_update_is_refused_and_the_model_is_the_honest_update(tmp_path):
    from safetensors.numpy import load_file

    script = tmp_path / "faulty.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    reasons = sorted(r["reason"] for r in summary["rejected_updates"])
    assert len(reasons) == 6 and all(r["round"] == 1 for r in summary["rejected_updates"]), reasons
    for expected in ("value(s) not finite", "shape", "dtype float64", "exceeds strategy.max_update_norm 50",
                     "missing tensor"):  # fmt: skip
        assert any(expected in reason for reason in reasons), (expected, reasons)
    assert sum("not finite" in reason for reason in reasons) == 2  # NaN and Inf
    assert summary["rounds"][0]["trained_orgs"] == ["org-0"]
    assert proc.stdout.count("rejected:") == 6
    honest = np.load(out / "honest.npz")
    final = load_file(out / "checkpoints" / "round-0001.safetensors")
    assert final.keys() == set(honest.files)
    for name in final:  # FedAvg of the one sound update is that update
        np.testing.assert_allclose(final[name], honest[name], rtol=1e-6, atol=1e-7)
