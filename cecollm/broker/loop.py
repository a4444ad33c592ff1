"""What the serving loops (broker, content manager) share: taking in a burst of messages.

A peer's bad input is the handlers' business (ProtocolError, answered and logged). A bug that
one message runs into must not take down the loop that serves every device: it is logged with
its traceback, counted, and the loop goes on with the next message.
"""

from __future__ import annotations

import logging

import zmq


def drain(sock: zmq.Socket, handler, log: logging.Logger, limit: int = 256) -> int:
    """Hand up to `limit` waiting messages to `handler`; the number of them it failed on."""
    failed = 0
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            break
        try:
            handler(frames)
        except Exception:  # noqa: BLE001 (a bug: logged with its traceback, the loop serves on)
            failed += 1
            log.exception("a message of %d frames could not be handled (a bug); dropped", len(frames))
    return failed
