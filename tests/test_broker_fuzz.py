"""Fuzz: at least 1000 random or malformed messages at each of the broker's sockets; every
message that can be answered is answered with an error, and the broker then still serves a
valid generation exactly."""

from __future__ import annotations

import random
import re
import struct
import time

import msgspec
import numpy as np
import pytest
import torch
import zmq

from cecollm.broker.launch import BrokerProcess
from cecollm.edge.client import EdgeClient, EdgeConfig
from cecollm.edge.heads import HeadSet
from cecollm.loading import load_model
from cecollm.split import Split
from cecollm.wire import broker_worker as wp
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.security import ClientKeys
from cecollm.wire.wire import Frames, pack_header

from conftest import hf_greedy, make_tiny_model

N = 1000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("model") / "tiny"
    make_tiny_model("mha").save_pretrained(path)
    log = tmp_path_factory.mktemp("logs") / "broker.log"
    with BrokerProcess(str(path), workers=1, extra=["--exits", "2,3"], log_path=log) as broker:
        broker.log_path = log
        yield broker, load_model(str(path))


def _garbage(rng: random.Random, module) -> list[bytes]:
    """One bad message for a boundary: random bytes, a good header with a bad body, bad headers..."""
    while True:
        frames = _any_garbage(rng, module)
        try:
            if isinstance(module.parse(frames), wp.Connect):
                continue  # a well-formed CONNECT is a real worker arriving, not bad input
        except Exception:
            pass
        return frames


def _random_body(rng: random.Random):
    """A MessagePack array of random values: a body of the right format with the wrong fields."""
    values = [rng.randrange(-(1 << 40), 1 << 40), rng.random(), "x" * rng.randrange(5), b"\0", None, True, [1, "a"],
              {"k": 1}, -1, 1 << 33]
    return msgspec.msgpack.encode([rng.choice(values) for _ in range(rng.randrange(8))])


def _any_garbage(rng: random.Random, module) -> list[bytes]:
    kind = rng.randrange(7)
    if kind == 0:
        return [rng.randbytes(rng.randrange(12)) for _ in range(rng.randrange(1, 6))]
    command = rng.choice(list(module.Command))
    if kind == 1:
        return [pack_header(module.TAG, module.VERSION, command)] + [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(4))]
    if kind == 2:
        return [pack_header(module.TAG, rng.choice([0, 2, 255]), command), b"\0" * 16]
    if kind == 3:
        return [pack_header(module.TAG, module.VERSION, rng.randrange(len(module.Command) + 1, 256)), b"x"]
    if kind == 4:
        return [pack_header(rng.choice([b"CE", b"CW", b"CS", b"ZZ"]), 1, command), b"\0" * rng.choice([4, 8, 16, 20])]
    if kind == 5:
        return [pack_header(module.TAG, module.VERSION, command), _random_body(rng)] + [rng.randbytes(8)] * rng.randrange(3)
    return _semantic(rng, module)


def _semantic(rng: random.Random, module) -> list[bytes]:
    """Well-formed messages that must still be refused (unknown devices, bad shapes, wrong model)."""
    device, n = rng.randrange(1000, 2000), rng.randrange(1, 4)
    if module is ep:
        choice = rng.randrange(6)
        if choice == 0:
            return ep.Decide(device, 1, rng.randrange(1 << 32), rng.randrange(100)).to_frames()
        if choice == 1:
            return ep.Hello(device, 1, "f" * 32, 6, (2, 3), 3, "float32", "float16", False).to_frames()  # another model
        if choice == 2:
            frames = ep.Upload(device, 1, 0, 0, np.zeros((n, 64), np.float16)).to_frames()
            frames[2] = struct.pack("!BBII", 1, 2, n + 1, 64)  # shape does not match the buffer
            return [bytes(f) for f in frames]
        if choice == 3:
            return [bytes(f) for f in ep.Upload(device, 1, 0, 0, np.zeros((n, 64), np.float16)).to_frames()]
        if choice == 4:
            return ep.UploadShm(device, 1, 0, 0, n).to_frames()
        return ep.End(device, 1).to_frames()
    if module is wp:
        return rng.choice([wp.Heartbeat(), wp.Reply(rng.randrange(1 << 40), Frames((b"x",))),
                           wp.Config("x", "y", "float32", (1,), 1, "z", 1, 1), wp.Request(1, Frames((b"x",)))]).to_frames()
    return rng.choice([sp.Lease(device, 1, 1, 3), sp.Commit(device, 5, 5, 1, 0.5), sp.Open(device, 77),
                       sp.Grant(1, 1, 1, 1, 1, "x")]).to_frames()


def _is_commit(frames) -> bool:
    try:
        return isinstance(sp.parse(frames), sp.Commit)
    except Exception:
        return False


def _fire(sock: zmq.Socket, messages, replies_expected: bool, expected: int) -> int:
    """Send every message; the number of replies that came back (waiting for `expected`, then a bit more)."""
    for frames in messages:
        sock.send_multipart(frames)
    if not replies_expected:
        return 0
    got, deadline = 0, time.monotonic() + 60
    while time.monotonic() < deadline:
        if not sock.poll(300 if got >= expected else 200):
            if got >= expected:
                break  # and nothing more came: more replies than expected would show
            continue
        sock.recv_multipart()
        got += 1
    return got


def test_fuzz_every_socket_then_serve_exactly(setup):
    broker, loaded = setup
    rng = random.Random(0)
    context = zmq.Context.instance()
    pid = broker.proc.pid
    log_text = broker.log_path.read_text
    state_address = f"ipc:///tmp/cecollm-{pid}-state.ipc"
    # the hostile client holds valid keys (the worst case: a device or worker host that was let in)
    sockets = {
        "request": (zmq.DEALER, broker.request_address, ep, True, True, broker.device_keys),
        "upload": (zmq.PUSH, broker.upload_address, ep, False, False, broker.device_keys),
        "worker": (zmq.DEALER, broker.worker_address, wp, True, False, broker.worker_keys),
        "state": (zmq.DEALER, state_address, sp, True, True, None),  # ipc: a file on this host, no CURVE
    }
    for name, (kind, address, module, answered, delimiter, keys) in sockets.items():
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if keys:
            ClientKeys.load(keys).secure(sock)
        sock.connect(address)
        messages = [_garbage(rng, module) for _ in range(N)]
        if delimiter:  # most go in a proper envelope; the rest must be answered as malformed
            messages = [[b"", *m] if rng.random() < 0.9 else m for m in messages]
        # a well-formed COMMIT in a proper envelope is one way: no reply, by design
        one_way = sum(1 for m in messages if m[0] == b"" and _is_commit(m[1:])) if module is sp else 0
        replies = _fire(sock, messages, answered, N - one_way)
        sock.close(0 if answered else 30_000)  # LINGER 0 would drop uploads not yet on the wire
        if answered:
            tail = "\n".join(log_text().splitlines()[-15:])
            assert replies == N - one_way, f"{name}: {replies} of {N - one_way} bad messages answered; log:\n{tail}"
    assert broker.proc.poll() is None, "the broker is still running"
    assert len(re.findall(r"refused", log_text())) >= 3 * N  # one log line per bad message
    split = Split.create(loaded.n_layers, (2, 3))
    config = EdgeConfig(exact=False, device_id=1, broker=broker.request_address, upload=broker.upload_address, threshold=1.0,
                        max_new_tokens=12, timeout=20, keys=broker.device_keys)
    with EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, (2, 3)), config) as client:
        result = client.generate([3, 1, 4, 1, 5])
    assert result.token_ids == hf_greedy(loaded.model, [3, 1, 4, 1, 5], 12)
    assert result.stats.cloud_tokens == 12
