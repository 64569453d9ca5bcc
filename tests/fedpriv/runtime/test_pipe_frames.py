"""fedpriv/runtime/pipe_frames.py: frames and task specs across a pipe."""

from __future__ import annotations

import os

from fedpriv.runtime import pipe_frames
from tests.fedpriv.runtime.superexec_specs import spec


def test_frames_survive_a_pipe_in_pieces():
    buffer = bytearray()
    read_end, write_end = os.pipe()
    try:
        payload = pipe_frames.spec_to_bytes(spec(token="tok-frames"))
        pipe_frames.send_frame(write_end, payload)
        pipe_frames.send_frame(write_end, b"{}")
        data = os.read(read_end, 65536)
    finally:
        os.close(read_end)
        os.close(write_end)
    buffer += data[:5]
    assert pipe_frames.take_frames(buffer) == []  # a partial frame waits for the rest
    buffer += data[5:]
    first, second = pipe_frames.take_frames(buffer)
    assert pipe_frames.spec_from_bytes(first) == spec(token="tok-frames") and second == b"{}" and not buffer
