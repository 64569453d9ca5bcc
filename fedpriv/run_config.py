"""Read the fedpriv config out of a Flower run config (the ``flwr run`` path).

``pyproject.toml`` declares three run-config keys: ``config`` (a YAML path, empty
for the packaged default), ``overrides`` (space-separated ``key=value``) and
``resume`` (a run folder to continue; it brings its own config, see
``server/resume.py``).
"""

from __future__ import annotations

import shlex
from functools import lru_cache

from flwr.app import Context

from fedpriv.config import FedPrivConfig, load_config

RESUME_KEY = "resume"


@lru_cache(maxsize=4)
def _load(path: str, overrides: str) -> FedPrivConfig:
    return load_config(path or None, shlex.split(overrides))


def config_from_context(context: Context) -> FedPrivConfig:
    run_config = context.run_config
    return _load(str(run_config.get("config", "")), str(run_config.get("overrides", "")))
