"""RpcSocket: a reply that comes after its call timed out is never taken for the next call's."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from cecollm.runtime import free_ports
from cecollm.wire.rpc import CallTimeout, RpcSocket


def _late_server(address: str, ready: threading.Event, got_first: threading.Event) -> None:
    """Answers the first request only once the second has arrived, then the second."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    ready.set()
    try:
        if not sock.poll(30_000):
            return
        first = sock.recv_multipart()
        got_first.set()
        if not sock.poll(30_000):
            return
        second = sock.recv_multipart()
        sock.send_multipart([first[0], b"", b"reply to " + first[-1]])  # late: its call gave up
        sock.send_multipart([second[0], b"", b"reply to " + second[-1]])
    finally:
        sock.close(0)


def test_a_late_reply_is_not_the_next_calls_reply():
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ready, got_first = threading.Event(), threading.Event()
    server = threading.Thread(target=_late_server, args=(address, ready, got_first))
    server.start()
    assert ready.wait(30)
    rpc = RpcSocket(zmq.Context.instance(), address)
    try:
        rpc.send([b"one"])
        assert got_first.wait(30)
        with pytest.raises(CallTimeout):
            rpc.receive(0.0)  # the deadline has passed: the call gives up
        rpc.send([b"two"])
        got = [bytes(f) for f in rpc.receive(time.monotonic() + 30)]
        assert got == [b"reply to two"]
    finally:
        rpc.close()
        server.join(40)


def test_sending_to_nobody_never_blocks():
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"  # nobody listens
    rpc = RpcSocket(zmq.Context.instance(), address)
    rpc.socket.setsockopt(zmq.SNDHWM, 1)  # a full queue at once (the default is 1000 calls)
    try:
        for _ in range(5):  # each call gives up; none blocks on a full queue
            try:
                rpc.send([b"x"])
                rpc.receive(0.0)
            except CallTimeout:
                pass
    finally:
        rpc.close()
