"""Session-wide fixtures: runs that more than one test module reads."""

from __future__ import annotations

import pytest

from tests.shared_runs import TINY_DP_RUN, simulate


@pytest.fixture(scope="session")
def tiny_dp_run(tmp_path_factory):
    """(process, run folder) of a finished tiny DP simulation (tests.shared_runs.TINY_DP_RUN); read it, never edit it."""
    return simulate(tmp_path_factory.mktemp("tiny-dp-run"), *TINY_DP_RUN)
