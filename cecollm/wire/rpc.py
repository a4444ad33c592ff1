"""A request/reply call over a DEALER socket that survives timeouts.

Sent like REQ (an empty delimiter, then the message) so a ROUTER peer sees the usual
envelope, but unlike REQ a call that times out leaves the socket usable: the socket is
closed and opened again (the Lazy Pirate pattern), so a late reply to the call that gave
up goes to a routing id nobody holds any more and is dropped by the peer, never taken for
the next call's reply, and messages still queued for an unreachable peer are discarded.
A send that cannot be queued within the send timeout is a CallTimeout too, never a hang.
"""

from __future__ import annotations

import time

import zmq


class CallTimeout(Exception):
    """No reply within the time allowed."""


class RpcSocket:
    """One DEALER connection; send() then receive() (bounded) make a call."""

    def __init__(self, context: zmq.Context, address: str, send_timeout: float = 5.0, keys=None,
                 max_reply_bytes: int = -1) -> None:
        """`keys` (security.ClientKeys): speak CURVE to the peer; `max_reply_bytes`: refuse larger replies."""
        self.context = context
        self.address = address
        self.send_timeout = send_timeout
        self.keys = keys
        self.max_reply_bytes = max_reply_bytes
        self.bytes_sent = 0
        self.bytes_received = 0
        self.poller = zmq.Poller()
        self.socket = self._open()

    def _open(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.send_timeout * 1000)))
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_reply_bytes)
        if self.keys is not None:
            self.keys.secure(sock)
        sock.connect(self.address)
        self.poller.register(sock, zmq.POLLIN)
        return sock

    def reset(self) -> None:
        """A new connection: nothing sent or due on the old one reaches this side any more."""
        self.poller.unregister(self.socket)
        self.socket.close(0)
        self.socket = self._open()

    def send(self, frames) -> None:
        try:
            self.socket.send_multipart([b"", *frames], copy=False)
        except zmq.Again:
            self.reset()
            raise CallTimeout(f"{self.address} took no message within {self.send_timeout:g} s") from None
        self.bytes_sent += sum(len(f) for f in frames)

    def receive(self, deadline: float):
        """The next reply's frames (without the delimiter), or CallTimeout at `deadline`."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.poller.poll(max(1, int(left * 1000))):
                self.reset()
                raise CallTimeout("no reply within the time allowed")
            frames = self.socket.recv_multipart(copy=False)
            self.bytes_received += sum(len(f.buffer) for f in frames)
            if frames and len(frames[0].buffer) == 0:
                return frames[1:]

    def poll(self, timeout: float):
        """The next reply's frames if one comes within `timeout` seconds (0: only one already here), else
        None; unlike receive() the socket stays as it is (a call may still be answered later)."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self.poller.poll(int(left * 1000)):
                return None
            frames = self.socket.recv_multipart(copy=False)
            self.bytes_received += sum(len(f.buffer) for f in frames)
            if frames and len(frames[0].buffer) == 0:
                return frames[1:]

    def close(self) -> None:
        self.socket.close(0)
