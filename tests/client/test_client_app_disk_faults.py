"""A node that cannot write its state answers with a one-line error reply naming the file, never a traceback."""

from __future__ import annotations

import errno
import os

import pytest

from fedpriv.client.client_app import answer_disk_errors, handle_train
from fedpriv.kernel.config import load_config
from tests.disk_faults import tmpfs
from tests.handler_messages import HANDLER_RUN, node_message, partition_context

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_a_node_on_a_read_only_disk_replies_with_one_line_and_sends_nothing(tmp_path):
    cfg = load_config(overrides=HANDLER_RUN)
    with tmpfs(tmp_path / "run", size="64k", read_only=True) as run:
        reply = answer_disk_errors(handle_train, cfg, node_message(cfg, run, 1), partition_context())
    assert reply.has_error() and not reply.has_content()
    reason = reply.error.reason
    assert reason.startswith(f"DiskError: cannot write {run / 'nodes'}") and "\n" not in reason
    assert reason.endswith("[Errno 30] Read-only file system")


def test_only_disk_failures_become_error_replies(tmp_path):
    cfg = load_config(overrides=HANDLER_RUN)
    message = node_message(cfg, tmp_path, 1)

    def full(cfg, msg, context):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.json"))

    reply = answer_disk_errors(full, cfg, message, partition_context())
    assert reply.error.reason == f"DiskError: cannot write {tmp_path / 'x.json'}: [Errno 28] No space left on device"

    def bug(cfg, msg, context):
        raise KeyError("a bug stays a bug")

    with pytest.raises(KeyError):
        answer_disk_errors(bug, cfg, message, partition_context())
