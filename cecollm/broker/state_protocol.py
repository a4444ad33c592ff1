"""Worker <-> content manager wire protocol (tag b"CS").

Worker DEALER (sent like REQ, with an empty delimiter) -> content manager ROUTER.
OPEN -> OPENED: a device starts a generation (a new session, a new shared-memory segment).
LEASE -> GRANT: the worker may compute on the device's state until COMMIT; the grant comes
when the rows up to the position have arrived (the manager waits, bounded) and no other
worker holds the device. COMMIT (one way, no reply): the state now holds `folded` positions in
its KV, the lease ends, and the token decided for the last of them is noted; a commit for a
lease that is no longer current is only logged (the request went to another worker, which
computes the same). LEASE -> DECIDED: the request was already served (its worker committed,
then died before its reply got out): the noted token, nothing to compute. OPEN and LEASE may be answered
with ERROR (codes from wire.ErrorCode); so is a message that cannot be read. No tensor crosses this socket: workers
compute in the segment.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cecollm.broker.wire import (
    MAX_TEXT, ErrorCode, ProtocolError, decode_text, expect_frames, pack_header, parse_header, unpack_fixed,
)

TAG = b"CS"
VERSION = 2  # 2: COMMIT carries the decided token; DECIDED


class Command(enum.IntEnum):
    OPEN = 1
    OPENED = 2
    LEASE = 3
    GRANT = 4
    COMMIT = 5
    ERROR = 6
    DECIDED = 7


def _head(command: Command) -> bytes:
    return pack_header(TAG, VERSION, command)


@dataclass(frozen=True)
class Open:
    device_id: int
    wire_code: int  # wire.DTYPES code of the rows the edge uploads

    _FIELDS = struct.Struct("!IB")

    def to_frames(self) -> list:
        return [_head(Command.OPEN), self._FIELDS.pack(self.device_id, self.wire_code)]

    @classmethod
    def from_frames(cls, frames) -> "Open":
        expect_frames(frames, 2, "OPEN")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "OPEN"))


@dataclass(frozen=True)
class Opened:
    session: int
    capacity: int
    rows_offset: int  # byte offset of row 0 in the segment
    segment: str

    _FIELDS = struct.Struct("!IIQ")

    def to_frames(self) -> list:
        return [_head(Command.OPENED), self._FIELDS.pack(self.session, self.capacity, self.rows_offset),
                self.segment.encode()]

    @classmethod
    def from_frames(cls, frames) -> "Opened":
        expect_frames(frames, 3, "OPENED")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "OPENED"), decode_text(frames[2], "OPENED segment"))


@dataclass(frozen=True)
class Lease:
    device_id: int
    session: int
    seq: int  # the edge request's seq: a re-dispatched request supersedes its own older lease
    position: int

    _FIELDS = struct.Struct("!IIII")

    def to_frames(self) -> list:
        return [_head(Command.LEASE), self._FIELDS.pack(self.device_id, self.session, self.seq, self.position)]

    @classmethod
    def from_frames(cls, frames) -> "Lease":
        expect_frames(frames, 2, "LEASE")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "LEASE"))


@dataclass(frozen=True)
class Grant:
    token: int  # the lease; COMMIT names it
    folded: int  # positions already in the KV cache
    received: int  # rows received (> the requested position)
    capacity: int
    wire_code: int
    segment: str

    _FIELDS = struct.Struct("!QIIIB")

    def to_frames(self) -> list:
        return [_head(Command.GRANT), self._FIELDS.pack(self.token, self.folded, self.received, self.capacity,
                                                         self.wire_code), self.segment.encode()]

    @classmethod
    def from_frames(cls, frames) -> "Grant":
        expect_frames(frames, 3, "GRANT")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "GRANT"), decode_text(frames[2], "GRANT segment"))


@dataclass(frozen=True)
class Commit:
    device_id: int
    token: int  # the lease
    folded: int
    decided: int  # the token decided after position folded - 1
    prob: float  # its probability

    _FIELDS = struct.Struct("!IQIId")

    def to_frames(self) -> list:
        return [_head(Command.COMMIT), self._FIELDS.pack(self.device_id, self.token, self.folded, self.decided,
                                                          self.prob)]

    @classmethod
    def from_frames(cls, frames) -> "Commit":
        expect_frames(frames, 2, "COMMIT")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "COMMIT"))


@dataclass(frozen=True)
class Decided:
    """The answer a committed request already got (LEASE of a request that was retried)."""

    position: int
    token: int
    prob: float

    _FIELDS = struct.Struct("!IId")

    def to_frames(self) -> list:
        return [_head(Command.DECIDED), self._FIELDS.pack(self.position, self.token, self.prob)]

    @classmethod
    def from_frames(cls, frames) -> "Decided":
        expect_frames(frames, 2, "DECIDED")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "DECIDED"))


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    message: str

    _FIELDS = struct.Struct("!B")

    def to_frames(self) -> list:
        return [_head(Command.ERROR), self._FIELDS.pack(int(self.code)), self.message.encode()[:MAX_TEXT]]

    @classmethod
    def from_frames(cls, frames) -> "Error":
        expect_frames(frames, 3, "ERROR")
        (code,) = unpack_fixed(cls._FIELDS, frames[1], "ERROR")
        try:
            code = ErrorCode(code)
        except ValueError:
            raise ProtocolError(f"ERROR: unknown code {code}") from None
        return cls(code, decode_text(frames[2], "ERROR message"))


MESSAGES = {Command.OPEN: Open, Command.OPENED: Opened, Command.LEASE: Lease, Command.GRANT: Grant,
            Command.COMMIT: Commit, Command.ERROR: Error, Command.DECIDED: Decided}
REQUESTS = (Command.OPEN, Command.LEASE, Command.COMMIT)
REPLIES = (Command.OPENED, Command.GRANT, Command.DECIDED, Command.ERROR)


def parse(frames, allowed=tuple(Command)):
    command = parse_header(frames, TAG, VERSION, Command)
    if command not in allowed:
        raise ProtocolError(f"command {command.name} is not expected here")
    return MESSAGES[command].from_frames(frames)
