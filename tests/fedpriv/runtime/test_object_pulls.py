"""Prompt object pulls: Flower's own pull_objects, asked again within 0.5 s instead of after 1-2-4-8 s."""

from __future__ import annotations

import time
import types

import httpx
import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal

from fedpriv.runtime import object_pulls


def _arrives_after(seconds: float):
    """A pull_object_fn whose objects are 'unavailable' until ``seconds`` have passed; counts the tries."""
    ready_at = time.monotonic() + seconds
    tries = []

    def pull(object_id: str) -> bytes:
        tries.append(object_id)
        if time.monotonic() < ready_at:
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    return pull, tries


def test_an_object_that_arrives_late_is_picked_up_within_half_a_second():
    pull, tries = _arrives_after(1.2)
    started = time.monotonic()
    got = object_pulls.prompt(inflatable_utils.pull_objects)(["a", "b"], pull)
    waited = time.monotonic() - started
    assert got == {"a": b"a", "b": b"b"}
    assert 1.2 <= waited < 1.2 + object_pulls.BACKOFF_CAP_S * 1.2 + 0.3
    assert len(tries) > 2 * 4  # asked again several times, not once per 1-2-4 s


def test_flowers_own_back_off_is_what_it_replaces():
    pull, _ = _arrives_after(1.2)
    started = time.monotonic()
    inflatable_utils.pull_objects(["a"], pull)
    assert time.monotonic() - started > 2.3  # 1 s then 2 s (+-20% jitter): the wait this module removes


def test_given_waits_are_only_ever_shortened_and_the_rest_is_flowers():
    seen = {}

    def pull_objects(object_ids, pull_object_fn, **options):
        seen.update(options)
        return {}

    prompt = object_pulls.prompt(pull_objects)
    prompt(["a"], None, initial_backoff=0.01, backoff_cap=5.0, max_time=7.0)
    assert seen == {"initial_backoff": 0.01, "backoff_cap": object_pulls.BACKOFF_CAP_S, "max_time": 7.0}
    assert object_pulls.prompt(prompt) is prompt  # installing twice wraps once


def _server_answers(*statuses: int):
    """A pull_object_fn that answers these HTTP statuses first (httpx raises for 5xx/4xx), then the object."""
    answers = list(statuses)

    def pull(object_id: str) -> bytes:
        if answers:
            status = answers.pop(0)
            request = httpx.Request("POST", "https://127.0.0.1:9092/v1/fleet/pull-object")
            httpx.Response(status, request=request).raise_for_status()
        return object_id.encode()

    return pull


def test_a_superlink_500_is_asked_again_not_a_dropped_message():
    # the SuperLink's SQLite answered "database is locked" (500) to one pull of ten busy nodes
    got = object_pulls.prompt(inflatable_utils.pull_objects)(["a"], _server_answers(500, 503))
    assert got == {"a": b"a"}


def test_a_client_error_or_a_server_that_keeps_failing_still_fails_the_pull():
    prompt = object_pulls.prompt(inflatable_utils.pull_objects)
    with pytest.raises(httpx.HTTPStatusError, match="401"):
        prompt(["a"], _server_answers(401))  # not transient: Flower's handling, unchanged
    failing = [500] * (object_pulls.SERVER_ERROR_TRIES + 1)
    with pytest.raises(inflatable_utils.ObjectPullError):
        prompt(["a"], _server_answers(*failing), max_time=0.5)  # Flower's own limits still apply
    with pytest.raises(httpx.HTTPStatusError, match="500"):
        # past SERVER_ERROR_TRIES: the server's error, as Flower had it (tries are counted, so short waits will do)
        prompt(["a"], _server_answers(*failing), initial_backoff=0.001, backoff_cap=0.01)
    assert prompt(["a"], _server_answers(*failing[1:]), initial_backoff=0.001, backoff_cap=0.01) == {"a": b"a"}


@pytest.mark.parametrize("module", [inflatable_utils, start_client_internal, http_grid])
def test_install_replaces_the_pull_of_each_hop(monkeypatch, module):
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    object_pulls.install(module)
    assert module.pull_objects.fedpriv_prompt


def test_a_flower_release_without_pull_objects_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="has no pull_objects in this Flower release"):
        object_pulls.install(types.ModuleType("flwr.moved"))
