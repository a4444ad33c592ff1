"""What every protocol module shares: the header frame, error codes, fixed fields, tensors.

A message is a list of frames: a 4-byte header (2-byte boundary tag, version, command),
then the message's own frames. Tensors travel as a small header frame (dtype code, shape)
and the raw buffer, sent with copy=False and read back with numpy.frombuffer (no copy).
Nothing a peer sent is ever unpickled. Bad input raises ProtocolError.
"""

from __future__ import annotations

import enum
import math
import struct

import numpy as np

from cecollm.errors import CecollmError

HEADER = struct.Struct("!2sBB")  # tag, version, command
MAX_TEXT = 4096  # longest text field (error messages, names, JSON) we accept


class ProtocolError(CecollmError):
    """A peer sent something that does not follow the protocol."""


class ErrorCode(enum.IntEnum):
    """Why a request was refused (shared by the edge and state boundaries)."""

    MALFORMED = 1  # the request did not parse
    MISMATCH = 2  # model identity or split differ between edge and cloud
    UNKNOWN_DEVICE = 3  # no state for this device/session (never opened, ended, evicted)
    MISSING = 4  # the hidden rows for the position did not arrive in time
    CAPACITY = 5  # the position is beyond the device's fixed capacity
    BUDGET = 6  # the content manager's byte budget has no room for a new device
    BUSY = 7  # the broker's queue is full
    WORKER_LOST = 8  # the worker died and the request was already retried
    INTERNAL = 9  # a bug or an unexpected failure on the cloud
    STALE = 10  # the request or lease was superseded


# Wire dtypes by one-byte code; numpy names are the interchange format.
DTYPES = {1: np.dtype("float16"), 2: np.dtype("float32")}
DTYPE_CODES = {v.name: k for k, v in DTYPES.items()}


def buffer_of(frame) -> memoryview:
    """The bytes of a frame received with copy=False (zmq.Frame) or copy=True (bytes)."""
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def pack_header(tag: bytes, version: int, command: int) -> bytes:
    return HEADER.pack(tag, version, int(command))


def parse_header(frames, tag: bytes, version: int, commands: type[enum.IntEnum]):
    """The command of a message (an enum member); ProtocolError for any other header."""
    if not frames:
        raise ProtocolError("empty message")
    head = buffer_of(frames[0])
    if len(head) != HEADER.size:
        raise ProtocolError(f"header of {len(head)} bytes, expected {HEADER.size}")
    got_tag, got_version, command = HEADER.unpack(head)
    if got_tag != tag:
        raise ProtocolError(f"protocol tag {got_tag!r}, expected {tag!r}")
    if got_version != version:
        raise ProtocolError(f"protocol version {got_version}, this side speaks {version}")
    try:
        return commands(command)
    except ValueError:
        raise ProtocolError(f"unknown command {command}") from None


def expect_frames(frames, count: int, what: str) -> None:
    if len(frames) != count:
        raise ProtocolError(f"{what}: {len(frames)} frames, expected {count}")


def unpack_fixed(layout: struct.Struct, frame, what: str) -> tuple:
    data = buffer_of(frame)
    if len(data) != layout.size:
        raise ProtocolError(f"{what}: fields of {len(data)} bytes, expected {layout.size}")
    return layout.unpack(data)


def decode_text(frame, what: str) -> str:
    data = buffer_of(frame)
    if len(data) > MAX_TEXT:
        raise ProtocolError(f"{what}: text of {len(data)} bytes (at most {MAX_TEXT})")
    try:
        return bytes(data).decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{what}: text is not UTF-8") from None


def decode_json(frame, what: str) -> dict:
    import orjson

    data = buffer_of(frame)
    if len(data) > MAX_TEXT:
        raise ProtocolError(f"{what}: JSON of {len(data)} bytes (at most {MAX_TEXT})")
    try:
        value = orjson.loads(bytes(data))
    except orjson.JSONDecodeError:
        raise ProtocolError(f"{what}: not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: JSON is not an object")
    return value


def json_field(obj: dict, key: str, kind, what: str):
    """obj[key], checked to be of `kind` (bool is not an int here)."""
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{what}: field {key!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


TENSOR_HEAD = struct.Struct("!BB")  # dtype code, ndim; then ndim x "!I"


def tensor_frames(array: np.ndarray) -> list:
    """[header, buffer] for a C-contiguous array; the buffer is the array's memory (zero copy)."""
    assert array.flags["C_CONTIGUOUS"], "tensor frames need a contiguous array"
    code = DTYPE_CODES[array.dtype.name]
    head = TENSOR_HEAD.pack(code, array.ndim) + struct.pack(f"!{array.ndim}I", *array.shape)
    if array.size == 0:  # a memoryview with a 0 in its shape cannot be cast to bytes
        return [head, b""]
    return [head, memoryview(array).cast("B")]


def tensor_from_frames(head_frame, data_frame, max_bytes: int, what: str) -> np.ndarray:
    """The array a (header, buffer) pair describes, viewing the frame's memory (no copy)."""
    head = buffer_of(head_frame)
    if len(head) < TENSOR_HEAD.size:
        raise ProtocolError(f"{what}: tensor header too short")
    code, ndim = TENSOR_HEAD.unpack(head[: TENSOR_HEAD.size])
    if code not in DTYPES:
        raise ProtocolError(f"{what}: unknown dtype code {code}")
    if not 1 <= ndim <= 4 or len(head) != TENSOR_HEAD.size + 4 * ndim:
        raise ProtocolError(f"{what}: bad tensor rank {ndim} for a header of {len(head)} bytes")
    shape = struct.unpack(f"!{ndim}I", head[TENSOR_HEAD.size:])
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a numpy int64 product could wrap to 0
    if nbytes > max_bytes:
        raise ProtocolError(f"{what}: tensor of {nbytes} bytes exceeds {max_bytes}")
    data = buffer_of(data_frame)
    if len(data) != nbytes:
        raise ProtocolError(f"{what}: buffer of {len(data)} bytes, shape {shape} {dtype.name} needs {nbytes}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # shape as sent
