"""Length-prefixed frames on a pipe: a task's spec down to a run's warm process, a child's report back up."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict


def send_frame(fd: int, payload: bytes) -> None:
    """One length-prefixed frame on a pipe (a task's spec, or a child's report); each pipe has one writer."""
    data = struct.pack("!I", len(payload)) + payload
    while data:
        data = data[os.write(fd, data) :]


def take_frames(buffer: bytearray) -> list[bytes]:
    """The complete frames at the start of ``buffer`` (removed from it); a partial frame stays."""
    frames = []
    while len(buffer) >= 4:
        (size,) = struct.unpack("!I", buffer[:4])
        if len(buffer) < 4 + size:
            break
        frames.append(bytes(buffer[4 : 4 + size]))
        del buffer[: 4 + size]
    return frames


def spec_to_bytes(spec) -> bytes:
    return json.dumps(asdict(spec)).encode()


def spec_from_bytes(data: bytes):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    fields = json.loads(data)
    return ExecutionSpec(**{**fields, "task_type": TaskType(fields["task_type"])})
