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

from fedpriv.kernel.config import FedPrivConfig, load_config
from fedpriv.kernel.file_stamps import file_stamp

RESUME_KEY = "resume"


@lru_cache(maxsize=4)
def _load(path: str, overrides: str, stamp: tuple | None) -> FedPrivConfig:
    del stamp  # part of the cache key only
    return load_config(path or None, shlex.split(overrides))


def config_from_context(context: Context) -> FedPrivConfig:
    run_config = context.run_config
    path = str(run_config.get("config", ""))
    # keyed on the file's stamp too: an edited config file is read again by a process that lives on (a node's
    # warm run process), never served from this cache
    return _load(path, str(run_config.get("overrides", "")), file_stamp(path))
