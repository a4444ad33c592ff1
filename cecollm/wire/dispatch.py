"""What the serving loops share: one table from message type to handler, and taking in a burst.

A loop declares its handlers once, as a `Dispatcher` from message type to function (as
SGLang's TypeBasedDispatcher); the table also says which commands the socket accepts, so a
message of any other type is refused when it is parsed. A peer's bad input is the handlers'
business (ProtocolError, answered and logged). A bug that one message runs into must not take
down the loop that serves every device: `drain` logs it with its traceback, counts it, and the
loop goes on with the next message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from cecollm.wire.wire import Message, ProtocolError


class Dispatcher:
    """Message type -> handler; calling it runs the handler of the message's type."""

    def __init__(self, table: dict[type[Message], Callable]) -> None:
        self.table = dict(table)
        self.commands = tuple(cls.command for cls in self.table)  # what `parse` may accept

    def __call__(self, msg: Message, *args):
        handler = self.table.get(type(msg))
        if handler is None:
            raise ProtocolError(f"{type(msg).__name__} is not handled here")
        return handler(msg, *args)


def drain(sock: zmq.Socket, handler, log: logging.Logger, limit: int = 256) -> int:
    """Hand up to `limit` waiting messages to `handler`; the number of them it failed on."""
    failed = 0
    for _ in range(limit):
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:  # asked, not tried: a zmq.Again per burst costs ~15 µs
            break
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:  # taken meanwhile (not by our loops, which own their sockets)
            break
        try:
            handler(frames)
        except Exception:  # noqa: BLE001 (a bug: logged with its traceback, the loop serves on)
            failed += 1
            log.exception("a message of %d frames could not be handled (a bug); dropped", len(frames))
    return failed
