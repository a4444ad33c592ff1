"""Edge <-> cloud wire protocol (tag b"CE").

Request channel (edge DEALER, sent like REQ with an empty delimiter frame -> broker ROUTER):
HELLO -> WELCOME | ERROR, DECIDE -> TOKEN | ERROR. Upload channel (edge PUSH -> content
manager PULL, no replies): UPLOAD (rows as a tensor), UPLOAD_SHM (rows already written into
the device's shared-memory segment), END (the generation ended: release the state).

`seq` numbers requests of a device; `session` names one generation's state on the cloud
(given by WELCOME); upload `seq` numbers a session's uploads, which must arrive in order.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np
import orjson

from cecollm.broker.wire import (
    DTYPE_CODES, MAX_TEXT, ErrorCode, ProtocolError, decode_json, decode_text, expect_frames, json_field,
    pack_header, parse_header, tensor_frames, tensor_from_frames, unpack_fixed,
)

TAG = b"CE"
VERSION = 1
MAX_UPLOAD_BYTES = 64 << 20  # largest upload tensor accepted


class Command(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    DECIDE = 3
    TOKEN = 4
    UPLOAD = 5
    UPLOAD_SHM = 6
    END = 7
    ERROR = 8


def _head(command: Command) -> bytes:
    return pack_header(TAG, VERSION, command)


@dataclass(frozen=True)
class Hello:
    """First request of a generation: who the edge is and what it runs."""

    device_id: int
    seq: int
    identity: str  # LoadedModel.identity of the edge's model
    n_layers: int
    exits: tuple[int, ...]
    upload_layer: int
    wire_dtype: str  # "float16" | "float32"
    shm: bool  # the edge will write rows into the device's shared-memory segment

    def to_frames(self) -> list:
        body = dict(device_id=self.device_id, seq=self.seq, identity=self.identity, n_layers=self.n_layers,
                    exits=list(self.exits), upload_layer=self.upload_layer, wire_dtype=self.wire_dtype, shm=self.shm)
        return [_head(Command.HELLO), orjson.dumps(body)]

    @classmethod
    def from_frames(cls, frames) -> "Hello":
        expect_frames(frames, 2, "HELLO")
        body = decode_json(frames[1], "HELLO")
        what = "HELLO"
        exits = body.get("exits")
        if not isinstance(exits, list) or not exits or not all(isinstance(e, int) and not isinstance(e, bool) for e in exits):
            raise ProtocolError("HELLO: exits must be a non-empty list of integers")
        wire = json_field(body, "wire_dtype", str, what)
        if wire not in DTYPE_CODES:
            raise ProtocolError(f"HELLO: wire dtype {wire!r} is not one of {', '.join(DTYPE_CODES)}")
        msg = cls(_u32(json_field(body, "device_id", int, what), "device_id"), _u32(json_field(body, "seq", int, what), "seq"),
                  json_field(body, "identity", str, what), json_field(body, "n_layers", int, what), tuple(exits),
                  json_field(body, "upload_layer", int, what), wire, json_field(body, "shm", bool, what))
        return msg


@dataclass(frozen=True)
class Welcome:
    """The cloud opened a session for the device."""

    device_id: int
    seq: int
    session: int  # names this generation's state; uploads and requests carry it
    capacity: int  # positions the state can hold
    rows_offset: int  # where row `p` starts in the segment: rows_offset + p * hidden * itemsize
    segment: str  # shared-memory segment name (the edge writes rows there when it asked for shm)

    _FIELDS = struct.Struct("!IIIIQ")

    def to_frames(self) -> list:
        return [_head(Command.WELCOME), self._FIELDS.pack(self.device_id, self.seq, self.session, self.capacity,
                                                           self.rows_offset), self.segment.encode()]

    @classmethod
    def from_frames(cls, frames) -> "Welcome":
        expect_frames(frames, 3, "WELCOME")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "WELCOME"), decode_text(frames[2], "WELCOME segment"))


@dataclass(frozen=True)
class Decide:
    """Ask the cloud for the token after `position`: no tensor, the rows went up already."""

    device_id: int
    seq: int
    session: int
    position: int

    _FIELDS = struct.Struct("!IIII")

    def to_frames(self) -> list:
        return [_head(Command.DECIDE), self._FIELDS.pack(self.device_id, self.seq, self.session, self.position)]

    @classmethod
    def from_frames(cls, frames) -> "Decide":
        expect_frames(frames, 2, "DECIDE")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "DECIDE"))


@dataclass(frozen=True)
class Token:
    """The cloud's token after `position`."""

    device_id: int
    seq: int
    position: int
    token: int
    prob: float
    cloud_seconds: float  # the worker's compute time for this request

    _FIELDS = struct.Struct("!IIIIdd")

    def to_frames(self) -> list:
        return [_head(Command.TOKEN), self._FIELDS.pack(self.device_id, self.seq, self.position, self.token,
                                                         self.prob, self.cloud_seconds)]

    @classmethod
    def from_frames(cls, frames) -> "Token":
        expect_frames(frames, 2, "TOKEN")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "TOKEN"))


@dataclass(frozen=True)
class Upload:
    """Upload-layer rows [start, start + n) of a session, rows [n, hidden] in the wire dtype."""

    device_id: int
    session: int
    seq: int  # the session's upload number, from 0
    start: int
    rows: np.ndarray  # [n, hidden]

    _FIELDS = struct.Struct("!IIII")

    def to_frames(self) -> list:
        return [_head(Command.UPLOAD), self._FIELDS.pack(self.device_id, self.session, self.seq, self.start),
                *tensor_frames(self.rows)]

    @classmethod
    def from_frames(cls, frames) -> "Upload":
        expect_frames(frames, 4, "UPLOAD")
        fields = unpack_fixed(cls._FIELDS, frames[1], "UPLOAD")
        rows = tensor_from_frames(frames[2], frames[3], MAX_UPLOAD_BYTES, "UPLOAD")
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ProtocolError(f"UPLOAD: rows must be [n >= 1, hidden], got shape {rows.shape}")
        return cls(*fields, rows)


@dataclass(frozen=True)
class UploadShm:
    """Rows [start, start + count) were written into the session's shared-memory segment."""

    device_id: int
    session: int
    seq: int
    start: int
    count: int

    _FIELDS = struct.Struct("!IIIII")

    def to_frames(self) -> list:
        return [_head(Command.UPLOAD_SHM), self._FIELDS.pack(self.device_id, self.session, self.seq, self.start, self.count)]

    @classmethod
    def from_frames(cls, frames) -> "UploadShm":
        expect_frames(frames, 2, "UPLOAD_SHM")
        msg = cls(*unpack_fixed(cls._FIELDS, frames[1], "UPLOAD_SHM"))
        if msg.count == 0:
            raise ProtocolError("UPLOAD_SHM: count is 0")
        return msg


@dataclass(frozen=True)
class End:
    """The generation ended: release the session's state."""

    device_id: int
    session: int

    _FIELDS = struct.Struct("!II")

    def to_frames(self) -> list:
        return [_head(Command.END), self._FIELDS.pack(self.device_id, self.session)]

    @classmethod
    def from_frames(cls, frames) -> "End":
        expect_frames(frames, 2, "END")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "END"))


@dataclass(frozen=True)
class Error:
    """A request was refused; `seq` is the request's (0 when it could not be read)."""

    seq: int
    code: ErrorCode
    message: str

    _FIELDS = struct.Struct("!IB")

    def to_frames(self) -> list:
        return [_head(Command.ERROR), self._FIELDS.pack(self.seq, int(self.code)),
                self.message.encode()[:MAX_TEXT]]

    @classmethod
    def from_frames(cls, frames) -> "Error":
        expect_frames(frames, 3, "ERROR")
        seq, code = unpack_fixed(cls._FIELDS, frames[1], "ERROR")
        try:
            code = ErrorCode(code)
        except ValueError:
            raise ProtocolError(f"ERROR: unknown code {code}") from None
        return cls(seq, code, decode_text(frames[2], "ERROR message"))


MESSAGES = {Command.HELLO: Hello, Command.WELCOME: Welcome, Command.DECIDE: Decide, Command.TOKEN: Token,
            Command.UPLOAD: Upload, Command.UPLOAD_SHM: UploadShm, Command.END: End, Command.ERROR: Error}
REQUESTS = (Command.HELLO, Command.DECIDE)  # what the request channel carries from the edge
REPLIES = (Command.WELCOME, Command.TOKEN, Command.ERROR)
UPLOADS = (Command.UPLOAD, Command.UPLOAD_SHM, Command.END)  # what the upload channel carries


def parse(frames, allowed=tuple(Command)):
    """The message `frames` hold, if its command is one of `allowed`."""
    command = parse_header(frames, TAG, VERSION, Command)
    if command not in allowed:
        raise ProtocolError(f"command {command.name} is not expected here")
    return MESSAGES[command].from_frames(frames)


def _u32(value: int, name: str) -> int:
    if not 0 <= value < 1 << 32:
        raise ProtocolError(f"{name} {value} out of range")
    return value
