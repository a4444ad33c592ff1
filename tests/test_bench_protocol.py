"""The baseline cloud's wire protocol: round trips and validation."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cecollm.bench import protocol as bp
from cecollm.broker.wire import ErrorCode, ProtocolError


def _wire(frames):
    """What a peer receives: every frame as bytes."""
    return [bytes(f) for f in frames]


def test_round_trips():
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    messages = [
        bp.Generate(7, 64, (1, 2, 49151)),
        bp.Response(7, (5, 6, 7), 0.25),
        bp.Response(8, (), 0.0),
        bp.Token(9, 42, 0.5, 0.125),
        bp.Error(3, ErrorCode.INTERNAL, "boom"),
    ]
    for msg in messages:
        assert bp.parse(_wire(msg.to_frames())) == msg
    for dtype in (np.float16, np.float32):
        msg = bp.DecideFull(11, rows.astype(dtype))
        back = bp.parse(_wire(msg.to_frames()))
        assert back.seq == 11 and back.rows.dtype == dtype
        np.testing.assert_array_equal(back.rows, rows.astype(dtype))


def test_requests_and_replies_are_told_apart():
    frames = _wire(bp.Token(1, 2, 0.5, 0.1).to_frames())
    with pytest.raises(ProtocolError, match="not expected"):
        bp.parse(frames, bp.REQUESTS)
    assert isinstance(bp.parse(frames, bp.REPLIES), bp.Token)


@pytest.mark.parametrize("frames, match", [
    ([], "empty"),
    ([b"BL\x02\x01", b"", b""], "version"),
    ([b"CE\x01\x01", b"", b""], "tag"),
    ([b"BL\x01\x63", b""], "unknown command"),
    ([struct.pack("!2sBB", b"BL", 1, 1), struct.pack("!II", 1, 4)], "frames"),
    ([struct.pack("!2sBB", b"BL", 1, 1), struct.pack("!II", 1, 4), b"\x00\x00\x01"], "multiple of 4"),
    ([struct.pack("!2sBB", b"BL", 1, 1), struct.pack("!II", 1, 4), b""], "token ids"),
    ([struct.pack("!2sBB", b"BL", 1, 1), struct.pack("!II", 1, 0), b"\x00\x00\x00\x01"], "max_new_tokens"),
    ([struct.pack("!2sBB", b"BL", 1, 1), struct.pack("!I", 1), b"\x00\x00\x00\x01"], "bytes"),
    ([struct.pack("!2sBB", b"BL", 1, 5), struct.pack("!IB", 1, 200), b"x"], "unknown code"),
])
def test_malformed_messages_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        bp.parse(frames)


def test_decide_full_checks_its_tensor():
    good = _wire(bp.DecideFull(1, np.zeros((2, 3), np.float32)).to_frames())
    with pytest.raises(ProtocolError, match="needs"):
        bp.parse([*good[:3], good[3][:-1]])  # buffer shorter than the shape
    with pytest.raises(ProtocolError, match=r"\[n >= 1"):
        bp.parse(_wire(bp.DecideFull(1, np.zeros((6,), np.float32)).to_frames()))  # rank 1
    with pytest.raises(ProtocolError, match="dtype"):
        bp.parse([*good[:2], b"\x09" + good[2][1:], good[3]])
