"""The ``flwr run`` path: both apps read the fedpriv config from Flower's run config."""

from __future__ import annotations

import tomllib
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedpriv.kernel.run_config import config_from_context

REPO = Path(__file__).resolve().parents[3]


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=None, run_config=run_config)


def test_pyproject_declares_the_apps_and_their_run_config():
    flwr = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {
        "serverapp": "fedpriv.server.server_app:app",
        "clientapp": "fedpriv.client.client_app:app",
    }
    assert flwr["config"] == {"config": "", "overrides": "", "resume": ""}
    from fedpriv.client.client_app import app as client_app
    from fedpriv.server.server_app import app as server_app

    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)


def test_run_config_overrides_and_config_file_reach_the_apps(tmp_path):
    cfg = config_from_context(_context({"config": "", "overrides": "model.name=tiny training.rounds=2"}))
    assert (cfg.model.name, cfg.training.rounds) == ("tiny", 2)
    file = tmp_path / "run.yaml"
    file.write_text("training:\n  rounds: 7\n")
    cfg = config_from_context(_context({"config": str(file), "overrides": "privacy.target_epsilon=3"}))
    assert (cfg.training.rounds, cfg.privacy.target_epsilon) == (7, 3.0)
    # quoted values with spaces survive (shell-like splitting)
    cfg = config_from_context(_context({"config": "", "overrides": "run.name='two words'"}))
    assert cfg.run.name == "two words"


def test_an_edited_config_file_is_read_again(tmp_path):
    """A process that lives on (a node's warm run process) never serves a config file's old contents."""
    file = tmp_path / "run.yaml"
    file.write_text("training:\n  rounds: 7\n")
    context = _context({"config": str(file), "overrides": ""})
    assert config_from_context(context).training.rounds == 7
    assert config_from_context(context) is config_from_context(context)  # unchanged: parsed once
    file.write_text("training:\n  rounds: 9\n")
    assert config_from_context(context).training.rounds == 9
