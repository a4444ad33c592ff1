"""Edge <-> stateless baseline cloud wire protocol (tag b"BL"), for the benchmark's baselines.

One request channel (edge DEALER, sent like REQ with an empty delimiter -> server ROUTER):
- GENERATE(prompt ids, max_new_tokens) -> RESPONSE(token ids, cloud seconds) | ERROR:
  the cloud-based deployment (the cloud runs the whole model).
- DECIDE_FULL(every upload-layer row [n, hidden], float16 or float32) -> TOKEN | ERROR: the
  cloud keeps nothing; it runs its layers over all rows and returns the token after the last.

Token ids travel as one frame of big-endian uint32. Nothing a peer sent is unpickled.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

from cecollm.broker.wire import (
    MAX_TEXT, ErrorCode, ProtocolError, buffer_of, expect_frames, pack_header, parse_header, tensor_frames,
    tensor_from_frames, unpack_fixed, decode_text,
)

TAG = b"BL"
VERSION = 1
MAX_IDS = 1 << 16  # most token ids one message carries
MAX_ROWS_BYTES = 256 << 20  # largest DECIDE_FULL tensor accepted
_ID = np.dtype(">u4")  # token ids on the wire


class Command(enum.IntEnum):
    GENERATE = 1
    RESPONSE = 2
    DECIDE_FULL = 3
    TOKEN = 4
    ERROR = 5


def _head(command: Command) -> bytes:
    return pack_header(TAG, VERSION, command)


def _ids_frame(ids: tuple[int, ...]) -> bytes:
    return np.asarray(ids, dtype=_ID).tobytes()


def _ids_from(frame, what: str, allow_empty: bool) -> tuple[int, ...]:
    data = buffer_of(frame)
    if len(data) % _ID.itemsize:
        raise ProtocolError(f"{what}: token ids frame of {len(data)} bytes is not a multiple of 4")
    count = len(data) // _ID.itemsize
    if count > MAX_IDS or (count == 0 and not allow_empty):
        raise ProtocolError(f"{what}: {count} token ids (1..{MAX_IDS} allowed)")
    return tuple(int(i) for i in np.frombuffer(data, dtype=_ID))


@dataclass(frozen=True)
class Generate:
    """Run the whole model on `prompt_ids` and return up to `max_new_tokens` greedy tokens."""

    seq: int
    max_new_tokens: int
    prompt_ids: tuple[int, ...]

    _FIELDS = struct.Struct("!II")

    def to_frames(self) -> list:
        return [_head(Command.GENERATE), self._FIELDS.pack(self.seq, self.max_new_tokens), _ids_frame(self.prompt_ids)]

    @classmethod
    def from_frames(cls, frames) -> "Generate":
        expect_frames(frames, 3, "GENERATE")
        seq, max_new = unpack_fixed(cls._FIELDS, frames[1], "GENERATE")
        if not 1 <= max_new <= MAX_IDS:
            raise ProtocolError(f"GENERATE: max_new_tokens {max_new} out of 1..{MAX_IDS}")
        return cls(seq, max_new, _ids_from(frames[2], "GENERATE", allow_empty=False))


@dataclass(frozen=True)
class Response:
    """The generated token ids and the cloud's compute time for them."""

    seq: int
    token_ids: tuple[int, ...]
    cloud_seconds: float

    _FIELDS = struct.Struct("!Id")

    def to_frames(self) -> list:
        return [_head(Command.RESPONSE), self._FIELDS.pack(self.seq, self.cloud_seconds), _ids_frame(self.token_ids)]

    @classmethod
    def from_frames(cls, frames) -> "Response":
        expect_frames(frames, 3, "RESPONSE")
        seq, seconds = unpack_fixed(cls._FIELDS, frames[1], "RESPONSE")
        return cls(seq, _ids_from(frames[2], "RESPONSE", allow_empty=True), seconds)


@dataclass(frozen=True)
class DecideFull:
    """Every upload-layer row of the sequence so far, [n, hidden]; the token after row n-1 is wanted."""

    seq: int
    rows: np.ndarray  # [n, hidden], float16 or float32

    _FIELDS = struct.Struct("!I")

    def to_frames(self) -> list:
        return [_head(Command.DECIDE_FULL), self._FIELDS.pack(self.seq), *tensor_frames(self.rows)]

    @classmethod
    def from_frames(cls, frames) -> "DecideFull":
        expect_frames(frames, 4, "DECIDE_FULL")
        (seq,) = unpack_fixed(cls._FIELDS, frames[1], "DECIDE_FULL")
        rows = tensor_from_frames(frames[2], frames[3], MAX_ROWS_BYTES, "DECIDE_FULL")
        if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
            raise ProtocolError(f"DECIDE_FULL: rows must be [n >= 1, hidden >= 1], got shape {rows.shape}")
        return cls(seq, rows)


@dataclass(frozen=True)
class Token:
    """The token after the last row, its probability, and the cloud's compute time."""

    seq: int
    token: int
    prob: float
    cloud_seconds: float

    _FIELDS = struct.Struct("!IIdd")

    def to_frames(self) -> list:
        return [_head(Command.TOKEN), self._FIELDS.pack(self.seq, self.token, self.prob, self.cloud_seconds)]

    @classmethod
    def from_frames(cls, frames) -> "Token":
        expect_frames(frames, 2, "TOKEN")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "TOKEN"))


@dataclass(frozen=True)
class Error:
    """A request was refused; `seq` is the request's (0 when it could not be read)."""

    seq: int
    code: ErrorCode
    message: str

    _FIELDS = struct.Struct("!IB")

    def to_frames(self) -> list:
        return [_head(Command.ERROR), self._FIELDS.pack(self.seq, int(self.code)), self.message.encode()[:MAX_TEXT]]

    @classmethod
    def from_frames(cls, frames) -> "Error":
        expect_frames(frames, 3, "ERROR")
        seq, code = unpack_fixed(cls._FIELDS, frames[1], "ERROR")
        try:
            code = ErrorCode(code)
        except ValueError:
            raise ProtocolError(f"ERROR: unknown code {code}") from None
        return cls(seq, code, decode_text(frames[2], "ERROR message"))


MESSAGES = {Command.GENERATE: Generate, Command.RESPONSE: Response, Command.DECIDE_FULL: DecideFull,
            Command.TOKEN: Token, Command.ERROR: Error}
REQUESTS = (Command.GENERATE, Command.DECIDE_FULL)
REPLIES = (Command.RESPONSE, Command.TOKEN, Command.ERROR)


def parse(frames, allowed=tuple(Command)):
    """The message `frames` hold, if its command is one of `allowed`."""
    command = parse_header(frames, TAG, VERSION, Command)
    if command not in allowed:
        raise ProtocolError(f"command {command.name} is not expected here")
    return MESSAGES[command].from_frames(frames)
