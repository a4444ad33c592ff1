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
with ERROR (codes from wire.ErrorCode); so is a message that cannot be read. Workers on the content manager's
host compute in the segment: no tensor crosses this socket for them.

A remote worker (another host: it cannot map the segment) sets LEASE's `remote` flag. Its grant is a
STATE_GRANT: the lease's numbers plus the state as tensors, the KV cache's filled part (positions
[0, folded) of every cloud layer) and the received rows not yet folded. It ends the lease with
STATE_COMMIT, a call: the KV entries it appended (positions [from, folded) of every cloud layer), which the
manager checks against the device's state and writes into the segment, answering COMMITTED or ERROR.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

from cecollm.broker.wire import (
    DTYPES, MAX_TEXT, ErrorCode, ProtocolError, decode_text, expect_frames, pack_header, parse_header, tensor_frames,
    tensor_from_frames, unpack_fixed,
)

TAG = b"CS"
VERSION = 3  # 2: COMMIT carries the decided token; DECIDED. 3: remote workers (LEASE flag, STATE_GRANT, ...)
MAX_STATE_BYTES = 1 << 31  # largest KV or rows tensor a remote grant or commit may carry


class Command(enum.IntEnum):
    OPEN = 1
    OPENED = 2
    LEASE = 3
    GRANT = 4
    COMMIT = 5
    ERROR = 6
    DECIDED = 7
    STATE_GRANT = 8
    STATE_COMMIT = 9
    COMMITTED = 10


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
    remote: bool = False  # the worker cannot map the segment: grant the state as tensors (STATE_GRANT)

    _FIELDS = struct.Struct("!IIIIB")

    def to_frames(self) -> list:
        return [_head(Command.LEASE), self._FIELDS.pack(self.device_id, self.session, self.seq, self.position,
                                                         int(self.remote))]

    @classmethod
    def from_frames(cls, frames) -> "Lease":
        expect_frames(frames, 2, "LEASE")
        *fields, remote = unpack_fixed(cls._FIELDS, frames[1], "LEASE")
        if remote not in (0, 1):
            raise ProtocolError(f"LEASE: remote flag {remote}, expected 0 or 1")
        return cls(*fields, bool(remote))


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


def _kv_tensor(head, data, positions: int, what: str) -> np.ndarray:
    """KV entries [cloud_layers * 2, n_kv, positions, head_dim] (float16 or float32)."""
    kv = tensor_from_frames(head, data, MAX_STATE_BYTES, what)
    if kv.ndim != 4 or kv.shape[2] != positions or kv.shape[0] % 2:
        raise ProtocolError(f"{what}: KV must be [layers * 2, kv heads, {positions}, head dim], got {kv.shape}")
    return kv


@dataclass(frozen=True, eq=False)
class StateGrant:
    """A remote worker's grant: the lease and the device's state, carried as tensors."""

    token: int  # the lease; STATE_COMMIT names it
    folded: int  # positions already in the KV cache
    received: int  # rows received (> the requested position)
    capacity: int
    kv: np.ndarray  # [cloud_layers * 2, n_kv, folded, head_dim], model dtype: the filled KV
    rows: np.ndarray  # [received - folded, hidden], wire dtype: rows not yet folded

    _FIELDS = struct.Struct("!QIII")

    def to_frames(self) -> list:
        return [_head(Command.STATE_GRANT), self._FIELDS.pack(self.token, self.folded, self.received, self.capacity),
                *tensor_frames(self.kv), *tensor_frames(self.rows)]

    @classmethod
    def from_frames(cls, frames) -> "StateGrant":
        expect_frames(frames, 6, "STATE_GRANT")
        token, folded, received, capacity = unpack_fixed(cls._FIELDS, frames[1], "STATE_GRANT")
        if not folded < received <= capacity:
            raise ProtocolError(f"STATE_GRANT: folded {folded}, received {received}, capacity {capacity} "
                                "(need folded < received <= capacity)")
        kv = _kv_tensor(frames[2], frames[3], folded, "STATE_GRANT kv")
        rows = tensor_from_frames(frames[4], frames[5], MAX_STATE_BYTES, "STATE_GRANT rows")
        if rows.ndim != 2 or rows.shape[0] != received - folded:
            raise ProtocolError(f"STATE_GRANT: rows must be [{received - folded}, hidden], got {rows.shape}")
        return cls(token, folded, received, capacity, kv, rows)

    @property
    def wire_code(self) -> int:
        return next(code for code, dtype in DTYPES.items() if dtype == self.rows.dtype)


@dataclass(frozen=True, eq=False)
class StateCommit:
    """A remote worker ends its lease: the KV entries of positions [start, folded) it computed."""

    device_id: int
    token: int  # the lease
    start: int  # the grant's folded
    folded: int
    decided: int  # the token decided after position folded - 1
    prob: float
    kv: np.ndarray  # [cloud_layers * 2, n_kv, folded - start, head_dim], model dtype

    _FIELDS = struct.Struct("!IQIIId")

    def to_frames(self) -> list:
        return [_head(Command.STATE_COMMIT), self._FIELDS.pack(self.device_id, self.token, self.start, self.folded,
                                                                self.decided, self.prob), *tensor_frames(self.kv)]

    @classmethod
    def from_frames(cls, frames) -> "StateCommit":
        expect_frames(frames, 4, "STATE_COMMIT")
        device_id, token, start, folded, decided, prob = unpack_fixed(cls._FIELDS, frames[1], "STATE_COMMIT")
        if folded <= start:
            raise ProtocolError(f"STATE_COMMIT: folded {folded} must be beyond start {start}")
        kv = _kv_tensor(frames[2], frames[3], folded - start, "STATE_COMMIT kv")
        return cls(device_id, token, start, folded, decided, prob, kv)


@dataclass(frozen=True)
class Committed:
    """The content manager took a STATE_COMMIT: the device's KV now holds `folded` positions."""

    folded: int

    _FIELDS = struct.Struct("!I")

    def to_frames(self) -> list:
        return [_head(Command.COMMITTED), self._FIELDS.pack(self.folded)]

    @classmethod
    def from_frames(cls, frames) -> "Committed":
        expect_frames(frames, 2, "COMMITTED")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "COMMITTED"))


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
            Command.COMMIT: Commit, Command.ERROR: Error, Command.DECIDED: Decided, Command.STATE_GRANT: StateGrant,
            Command.STATE_COMMIT: StateCommit, Command.COMMITTED: Committed}
REQUESTS = (Command.OPEN, Command.LEASE, Command.COMMIT, Command.STATE_COMMIT)
REPLIES = (Command.OPENED, Command.GRANT, Command.DECIDED, Command.ERROR, Command.STATE_GRANT, Command.COMMITTED)


def parse(frames, allowed=tuple(Command)):
    command = parse_header(frames, TAG, VERSION, Command)
    if command not in allowed:
        raise ProtocolError(f"command {command.name} is not expected here")
    return MESSAGES[command].from_frames(frames)
