"""Wire protocols: every message round-trips; bad frames raise ProtocolError, never anything else.

Bodies are MessagePack arrays of a message's fields in declaration order (wire/wire.py); the
hostile frames below are written by hand in that format, each breaking one declared bound."""

from __future__ import annotations

import random
import struct

import msgspec
import numpy as np
import pytest

from cecollm.dtypes import numpy_dtype
from cecollm.wire import broker_worker as wp
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.wire import MAX_BODY, ErrorCode, Frames, ProtocolError, pack_header

EDGE_MESSAGES = [
    ep.Hello(3, 1, "ab" * 16, 30, (8, 15), 15, "float32", "float16", False),
    ep.Hello(2**32 - 1, 7, "x", 6, (2,), 2, "float32", "float32", True),
    ep.Hello(5, 2, "x", 6, (2,), 2, "bfloat16", "bfloat16", True),
    ep.Welcome(3, 1, 99, 1024, 4096, "cecollm-1-3-99"),
    ep.Decide(3, 2, 99, 41),
    ep.Token(41, 1234, 0.5, 3, 2, 0.001),
    ep.UploadShm(3, 99, 0, 0, 17),
    ep.End(3, 99),
    ep.Error(2, ErrorCode.UNKNOWN_DEVICE, "device 3 has no state"),
]
WORKER_MESSAGES = [
    wp.Connect(1234), wp.Config("/m", "id", "bfloat16", (2, 4), 4, "ipc:///tmp/x", 250, 4), wp.Ready(), wp.Heartbeat(),
    wp.Request(7, Frames((b"a", b"bc"))), wp.Reply(2**63 - 1, Frames((b"z",))), wp.Disconnect(), wp.Error("bad"),
]
STATE_MESSAGES = [
    sp.Open(3, 1), sp.Opened(5, 1024, 8192, "seg"), sp.Lease(3, 5, 9, 40), sp.Grant(11, 3, 41, 1024, 2, "seg"),
    sp.Commit(3, 11, 41, 7, 0.5), sp.Decided(40, 7, 0.5), sp.Error(ErrorCode.MISSING, "late"),
]


def _wire(frames):
    """What a peer receives: bytes (the sender may have used memoryviews)."""
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("module,msg", [(ep, m) for m in EDGE_MESSAGES] + [(wp, m) for m in WORKER_MESSAGES]
                         + [(sp, m) for m in STATE_MESSAGES])
def test_round_trip(module, msg):
    assert module.parse(_wire(msg.to_frames())) == msg


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_upload_tensor_round_trip_without_copy(dtype):
    rows = np.arange(3 * 576).astype(numpy_dtype(dtype)).reshape(3, 576)
    frames = ep.Upload(3, 9, 2, 40, rows).to_frames()
    assert isinstance(frames[3], memoryview)  # the array's own memory goes to the socket
    back = ep.parse(_wire(frames))
    assert (back.device_id, back.session, back.seq, back.start) == (3, 9, 2, 40)
    assert back.rows.dtype == rows.dtype and back.rows.shape == (3, 576) and np.array_equal(back.rows, rows)


def _tensor_head(code, shape):
    return struct.pack("!BB", code, len(shape)) + struct.pack(f"!{len(shape)}I", *shape)


def _body(*fields) -> bytes:
    return msgspec.msgpack.encode(list(fields))


def _head(module, command):
    return pack_header(module.TAG, module.VERSION, command)


def _upload_frames(head, data):
    return [_head(ep, ep.Command.UPLOAD), _body(1, 1, 0, 0, 0), head, data]


def _hello(**change):
    fields = dict(zip(["device_id", "seq", "identity", "n_layers", "exits", "upload_layer", "dtype", "wire_dtype", "shm"],
                      [1, 1, "x", 6, [2], 2, "float32", "float16", False]))
    fields.update(change)
    return [_head(ep, ep.Command.HELLO), _body(*fields.values())]


BAD_EDGE = {
    "empty": [],
    "short header": [b"CE\x02"],
    "wrong tag": [pack_header(b"XX", ep.VERSION, ep.Command.DECIDE), _body(1, 1, 1, 1)],
    "wrong version": [pack_header(ep.TAG, 9, ep.Command.DECIDE), _body(1, 1, 1, 1)],
    "the old version": [pack_header(ep.TAG, 1, ep.Command.DECIDE), struct.pack("!IIII", 1, 1, 1, 1)],
    "unknown command": [pack_header(ep.TAG, ep.VERSION, 200), b""],
    "missing body": [_head(ep, ep.Command.DECIDE)],
    "body not msgpack": [_head(ep, ep.Command.DECIDE), b"\xc1"],
    "body a map": [_head(ep, ep.Command.DECIDE), msgspec.msgpack.encode({"device_id": 1})],
    "too few fields": [_head(ep, ep.Command.DECIDE), _body(1, 1, 1)],
    "too many fields": [_head(ep, ep.Command.DECIDE), _body(1, 1, 1, 1, 1)],
    "extra frame": [_head(ep, ep.Command.DECIDE), _body(1, 1, 1, 1), b"x"],
    "body too large": [_head(ep, ep.Command.ERROR), _body(1, 1, "x" * (MAX_BODY + 1))],
    "hello exits as strings": _hello(exits=["2"]),
    "hello no exits": _hello(exits=[]),
    "hello bad dtype": _hello(wire_dtype="int8"),
    "hello bad compute dtype": _hello(dtype="int8"),
    "hello no compute dtype": [_head(ep, ep.Command.HELLO), _body(1, 1, "x", 6, [2], 2, "float16", False)],
    "hello negative id": _hello(device_id=-1),
    "hello id past 32 bits": _hello(device_id=1 << 32),
    "hello shm as int": _hello(shm=1),
    "hello long identity": _hello(identity="x" * 5000),
    "tensor dtype": _upload_frames(_tensor_head(7, (1, 4)), b"\0" * 8),
    "tensor rank 0": _upload_frames(struct.pack("!BB", 1, 0), b""),
    "tensor rank 3": _upload_frames(_tensor_head(1, (1, 1, 4)), b"\0" * 8),
    "tensor short buffer": _upload_frames(_tensor_head(1, (2, 4)), b"\0" * 8),
    "tensor long buffer": _upload_frames(_tensor_head(1, (1, 4)), b"\0" * 9),
    "tensor oversize": _upload_frames(_tensor_head(2, (1 << 20, 1 << 10)), b"\0" * 8),
    "tensor no rows": _upload_frames(_tensor_head(1, (0, 4)), b""),
    # 2**31 * 2**31 * 4 elements: an int64 product wraps to 0 and would match an empty buffer
    "tensor size overflow": _upload_frames(_tensor_head(1, (1 << 31, 1 << 31, 4)), b""),
    "tensor size overflow 2d": _upload_frames(_tensor_head(1, ((1 << 32) - 1, (1 << 32) - 1)), b""),
    "tensor frames missing": _upload_frames(_tensor_head(1, (1, 4)), b"\0" * 8)[:3],
    "tensor placeholder not 0": [_head(ep, ep.Command.UPLOAD), _body(1, 1, 0, 0, 5), _tensor_head(1, (1, 4)), b"\0" * 8],
    "upload_shm count 0": [_head(ep, ep.Command.UPLOAD_SHM), _body(1, 1, 0, 0, 0)],
    "error bad code": [_head(ep, ep.Command.ERROR), _body(1, 250, "x")],
    "error not utf8": [_head(ep, ep.Command.ERROR), b"\x93\x01\x01\xa2\xff\xfe"],
}


@pytest.mark.parametrize("name", sorted(BAD_EDGE))
def test_bad_edge_frames_raise_protocol_error(name):
    with pytest.raises(ProtocolError):
        ep.parse(BAD_EDGE[name])


def test_command_not_allowed_on_this_channel():
    with pytest.raises(ProtocolError, match="not expected"):
        ep.parse(ep.Token(1, 1, 1, 1, 0.5, 0.0).to_frames(), ep.REQUESTS)
    with pytest.raises(ProtocolError, match="not expected"):
        sp.parse(sp.Grant(1, 1, 1, 1, 1, "x").to_frames(), sp.REQUESTS)


def test_worker_and_state_validation():
    with pytest.raises(ProtocolError):
        wp.parse([_head(wp, wp.Command.REQUEST), _body(1, 0)])  # no payload
    with pytest.raises(ProtocolError):
        wp.parse([_head(wp, wp.Command.REQUEST), _body(1, 1)])  # a payload frame announced, none sent
    with pytest.raises(ProtocolError):
        wp.parse([_head(wp, wp.Command.REQUEST), _body(1, 20)] + [b""] * 20)  # too many frames
    with pytest.raises(ProtocolError):
        wp.parse([_head(wp, wp.Command.REQUEST), _body(1, 1)] + [b""] * 2)  # frames the fields do not account for
    with pytest.raises(ProtocolError):
        wp.parse([_head(wp, wp.Command.CONFIG), _body(3, "id", [2], 2, "x", 250, 4)])  # model_dir a number
    with pytest.raises(ProtocolError):
        sp.parse([_head(sp, sp.Command.ERROR), _body(0x63, "x")])  # unknown code
    with pytest.raises(ProtocolError):
        sp.parse([_head(sp, sp.Command.GRANT), _body(1, 1, 2, 64, 9, "seg")])  # unknown wire dtype code
    with pytest.raises(ProtocolError):
        sp.parse(ep.Decide(1, 1, 1, 1).to_frames())  # another boundary's tag


def test_random_frames_never_raise_anything_but_protocol_error():
    rng = random.Random(0)
    headers = [pack_header(m.TAG, m.VERSION, c) for m in (ep, wp, sp) for c in m.Command]
    values = [0, 1, -1, 1 << 40, 0.5, "x", "float16", b"\0", None, True, [1], [], {"a": 1}]
    for _ in range(3000):
        frames = [rng.choice(headers) if rng.random() < 0.7 else rng.randbytes(rng.randrange(6))]
        if rng.random() < 0.5:  # a body of the right format with random fields
            frames.append(_body(*(rng.choice(values) for _ in range(rng.randrange(9)))))
        frames += [rng.randbytes(rng.choice([0, 1, 4, 8, 16, 20, 24, 32])) for _ in range(rng.randrange(5))]
        for module in (ep, wp, sp):
            try:
                module.parse(frames)
            except ProtocolError:
                pass


def _state_grant(folded=3, received=5, kv_dtype="float32", rows_dtype="float16"):
    kv = np.arange(2 * 2 * 1 * folded * 8, dtype=kv_dtype).reshape(4, 1, folded, 8)  # [L*2, kv, folded, hd]
    rows = np.arange((received - folded) * 16, dtype=rows_dtype).reshape(received - folded, 16)
    return sp.StateGrant(11, folded, received, 64, kv, rows)


@pytest.mark.parametrize("folded", [0, 3])
def test_remote_state_messages_round_trip(folded):
    assert sp.parse(_wire(sp.Lease(3, 5, 9, 40, True).to_frames())) == sp.Lease(3, 5, 9, 40, True)
    grant = _state_grant(folded)
    back = sp.parse(_wire(grant.to_frames()), sp.REPLIES)
    assert (back.token, back.folded, back.received, back.capacity, back.wire_code) == (11, folded, 5, 64, 1)
    assert back.kv.dtype == grant.kv.dtype and np.array_equal(back.kv, grant.kv) and back.kv.shape[2] == folded
    assert np.array_equal(back.rows, grant.rows) and back.rows.dtype == np.float16
    kv = np.ones((4, 1, 2, 8), dtype=np.float32)
    commit = sp.StateCommit(3, 11, folded, folded + 2, 7, 0.5, kv)
    frames = commit.to_frames()
    assert isinstance(frames[3], memoryview)  # the KV's own memory goes to the socket
    back = sp.parse(_wire(frames), sp.REQUESTS)
    assert (back.device_id, back.token, back.start, back.folded, back.decided, back.prob) == (3, 11, folded, folded + 2, 7, 0.5)
    assert np.array_equal(back.kv, kv)
    assert sp.parse(_wire(sp.Committed(5).to_frames()), sp.REPLIES) == sp.Committed(5)


def _replace(frames, index, frame):
    frames = _wire(frames)
    frames[index] = frame
    return frames


GRANT = _state_grant()
COMMIT = sp.StateCommit(3, 11, 3, 5, 7, 0.5, np.ones((4, 1, 2, 8), dtype=np.float32))
BAD_STATE = {
    "lease remote flag 2": [_head(sp, sp.Command.LEASE), _body(1, 1, 1, 1, 2)],
    "lease of version 3": [pack_header(sp.TAG, 3, sp.Command.LEASE), struct.pack("!IIIIB", 1, 1, 1, 1, 0)],
    "grant folded past received": _replace(GRANT.to_frames(), 1, _body(11, 5, 5, 64, 0, 0)),
    "grant received past capacity": _replace(GRANT.to_frames(), 1, _body(11, 3, 65, 64, 0, 0)),
    "grant kv positions": _replace(_replace(GRANT.to_frames(), 2, _tensor_head(2, (4, 1, 2, 8))), 3, b"\0" * 256),
    "grant kv odd layers": _replace(_replace(GRANT.to_frames(), 2, _tensor_head(2, (3, 1, 3, 8))), 3, b"\0" * 288),
    "grant kv rank 3": _replace(_replace(GRANT.to_frames(), 2, _tensor_head(2, (4, 3, 8))), 3, b"\0" * 384),
    "grant rows count": _replace(_replace(GRANT.to_frames(), 4, _tensor_head(1, (3, 16))), 5, b"\0" * 96),
    "grant rows short buffer": _replace(GRANT.to_frames(), 5, b"\0" * 10),
    "grant rows dtype": _replace(GRANT.to_frames(), 4, _tensor_head(9, (2, 16))),
    "grant missing frame": _wire(GRANT.to_frames())[:5],
    "grant kv oversize": _replace(GRANT.to_frames(), 2, _tensor_head(2, (1 << 16, 1 << 16, 3, 1 << 8))),
    "commit nothing folded": _replace(COMMIT.to_frames(), 1, _body(3, 11, 5, 5, 7, 0.5, 0)),
    "commit kv positions": _replace(COMMIT.to_frames(), 1, _body(3, 11, 3, 6, 7, 0.5, 0)),
    "commit kv buffer": _replace(COMMIT.to_frames(), 3, b"\0" * 7),
    "committed negative": [_head(sp, sp.Command.COMMITTED), _body(-3)],
}


@pytest.mark.parametrize("name", sorted(BAD_STATE))
def test_bad_remote_state_frames_raise_protocol_error(name):
    with pytest.raises(ProtocolError):
        sp.parse(BAD_STATE[name])


def test_a_remote_commit_is_a_request_and_its_grant_a_reply():
    with pytest.raises(ProtocolError, match="not expected"):
        sp.parse(_wire(GRANT.to_frames()), sp.REQUESTS)
    with pytest.raises(ProtocolError, match="not expected"):
        sp.parse(_wire(COMMIT.to_frames()), sp.REPLIES)
