"""The baseline cloud's wire protocol: round trips and validation."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest

from cecollm.bench.baselines import protocol as bp
from cecollm.wire.wire import ErrorCode, ProtocolError


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


def _msg(command, *fields, extra=()):
    return [struct.pack("!2sBB", b"BL", bp.VERSION, command), msgspec.msgpack.encode(list(fields)), *extra]


@pytest.mark.parametrize("frames, match", [
    ([], "empty"),
    ([b"BL\x09\x01", b"", b""], "version"),
    ([b"CE\x02\x01", b"", b""], "tag"),
    ([b"BL\x02\x63", b""], "unknown command"),
    (_msg(1, 1, 4), "length 3"),
    (_msg(1, 1, 4, [1], extra=[b"x"]), "frames"),
    (_msg(1, 1, 4, []), "length >= 1"),
    (_msg(1, 1, 0, [1]), "max_new_tokens|>= 1"),
    (_msg(1, 1, 4, [-1]), ">= 0"),
    (_msg(1, 1, 4, list(range(bp.MAX_IDS + 1))), "length <= 8192"),
    (_msg(1, 1, 4, "1"), "Expected `array`"),
    (_msg(5, 1, 200, "x"), "enum"),
])
def test_malformed_messages_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        bp.parse(frames)


def test_decide_full_checks_its_tensor():
    good = _wire(bp.DecideFull(1, np.zeros((2, 3), np.float32)).to_frames())
    with pytest.raises(ProtocolError, match="needs"):
        bp.parse([*good[:3], good[3][:-1]])  # buffer shorter than the shape
    with pytest.raises(ProtocolError, match="rank 1"):
        bp.parse([*good[:2], struct.pack("!BBI", 2, 1, 6), b"\0" * 24])  # rank 1
    with pytest.raises(ProtocolError, match=r"\[n >= 1"):
        bp.parse([*good[:2], struct.pack("!BBII", 2, 2, 0, 3), b""])  # no rows
    with pytest.raises(ProtocolError, match="dtype"):
        bp.parse([*good[:2], b"\x09" + good[2][1:], good[3]])
