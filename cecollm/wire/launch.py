"""Daemon -> launcher wire protocol (tag b"CL"): a started daemon says it serves, or why not.

The launcher binds a PULL socket and hands its address to the daemon it starts (the
CECOLLM_READY environment variable, or an argument for a spawned child); the daemon's runtime
PUSHes one READY once it serves, with what the launcher needs to reach it (its addresses), or
FAILED with the one-line reason it could not start. No printed line is parsed.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from cecollm.wire.wire import U32, Boundary, Message, Text

Command = enum.IntEnum("Command", "READY FAILED")  # 1, 2


LAUNCH = Boundary(b"CL", 1, Command)

Info = Annotated[dict[Text, Text], msgspec.Meta(max_length=64)]


class DaemonNews(Message, frozen=True):
    """Which daemon speaks: its role (broker, content-manager, worker, ...) and process id."""

    role: Text
    pid: U32


@LAUNCH.message(Command.READY)
class Ready(DaemonNews, frozen=True):
    """The daemon serves; `info` holds what its launcher needs (addresses, pids, the split)."""

    info: Info


@LAUNCH.message(Command.FAILED)
class Failed(DaemonNews, frozen=True):
    """The daemon could not start, and why (one line, for the person who started it)."""

    message: Text


MESSAGES = LAUNCH.messages
parse = LAUNCH.decode
