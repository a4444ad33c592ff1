"""A request/reply call over a DEALER socket that survives timeouts.

Sent like REQ (an empty delimiter, then the message) so a ROUTER peer sees the usual
envelope, but unlike REQ a call that times out leaves the socket usable: late replies to
earlier calls are recognised by the caller (sequence numbers) and skipped.
"""

from __future__ import annotations

import time

import zmq


class CallTimeout(Exception):
    """No reply within the time allowed."""


class RpcSocket:
    """One DEALER connection; call() sends a message and waits (bounded) for a reply."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, frames) -> None:
        self.bytes_sent += sum(len(f) for f in frames)
        self.socket.send_multipart([b"", *frames], copy=False)

    def receive(self, deadline: float):
        """The next reply's frames (without the delimiter), or CallTimeout at `deadline`."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.poller.poll(max(1, int(left * 1000))):
                raise CallTimeout(f"no reply within the time allowed")
            frames = self.socket.recv_multipart(copy=False)
            self.bytes_received += sum(len(f.buffer) for f in frames)
            if frames and len(frames[0].buffer) == 0:
                return frames[1:]

    def close(self) -> None:
        self.socket.close(0)
