"""Session-wide fixtures: runs that more than one test module reads."""

from __future__ import annotations

import os

import pytest

from tests.shared_runs import TINY_DP_RUN, TINY_DP_RUN_ENV, simulate


@pytest.fixture(scope="session", autouse=True)
def truncation_cache_of_this_session(tmp_path_factory):
    """The plans' truncation counts (simulations/truncation_cache.py) kept for this session's runs only, every
    ``fedpriv`` process they start included: counted once per data set, never read from the user's cache."""
    from fedpriv.simulations.truncation_cache import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("fedpriv-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def tiny_dp_run(tmp_path_factory):
    """(process, run folder) of a finished tiny DP simulation (tests.shared_runs.TINY_DP_RUN); read it, never edit it."""
    return simulate(tmp_path_factory.mktemp("tiny-dp-run"), *TINY_DP_RUN, env=TINY_DP_RUN_ENV)


@pytest.fixture
def flower_task_identity(monkeypatch):
    """The run, node and task ids Flower's runtime sets in a process before messages are created."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
