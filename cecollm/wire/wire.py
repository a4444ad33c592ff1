"""The framing every boundary shares, and the one way messages are declared.

A message is a list of frames: a 4-byte header (2-byte boundary tag, version, command), a body
frame (the message's fields, MessagePack as an array in declaration order), then one frame pair
per tensor field (a small header: dtype code, shape; then the raw buffer, sent with copy=False
and read back with numpy.frombuffer, no copy), then any frames a message carries through
untouched. A message type is a `Message` (a msgspec Struct): its fields with their types and
bounds are its whole declaration; packing, validation and unpacking follow from it, the same
for every message. Nothing a peer sent is ever unpickled. Bad input raises ProtocolError.
"""

from __future__ import annotations

import enum
import math
import struct
import threading
from typing import Annotated, ClassVar, get_args, get_origin

import msgspec
import numpy as np

from cecollm.dtypes import numpy_dtype
from cecollm.errors import CecollmError

HEADER = struct.Struct("!2sBB")  # tag, version, command
MAX_TEXT = 4096  # longest text field (error messages, names, identities) we accept
MAX_BODY = 64 << 10  # largest body frame: fields only, tensors travel in frames of their own


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
    FORBIDDEN = 11  # the peer's key may not act for the device the message names
    IN_USE = 12  # another edge is generating with this device id (HELLO without take-over)
    NOT_YET = 13  # a lease must wait (rows still in flight, or another worker holds the device): park the request


# Wire dtypes by one-byte code; numpy names are the interchange format (bfloat16: ml_dtypes').
DTYPES = {1: numpy_dtype("float16"), 2: numpy_dtype("float32"), 3: numpy_dtype("bfloat16")}
DTYPE_CODES = {v.name: k for k, v in DTYPES.items()}

# Field types: a type and its bounds, checked on every message received.
U8 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 8)]
U16 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 16)]
U32 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
U64 = Annotated[int, msgspec.Meta(ge=0)]  # MessagePack integers end at 2**64 - 1
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
WireDtype = Annotated[str, msgspec.Meta(pattern="^(float16|float32|bfloat16)$")]  # a name of DTYPES
ComputeDtype = Annotated[str, msgspec.Meta(pattern="^(float32|bfloat16|float16)$")]  # a model's, dtypes.COMPUTE_DTYPES


def clip(text: str) -> str:
    """`text` cut to what a Text field accepts (error messages built from exceptions)."""
    return text[:MAX_TEXT]


class TensorSpec:
    """Bounds of a tensor field: its rank and its size in bytes."""

    def __init__(self, ndim: int, max_bytes: int) -> None:
        self.ndim = ndim
        self.max_bytes = max_bytes


def Tensor(ndim: int, max_bytes: int):  # noqa: N802 (a type, spelled like one)
    """The type of a tensor field: a numpy array of `ndim` dimensions, at most `max_bytes`."""
    return Annotated[np.ndarray, TensorSpec(ndim, max_bytes)]


class Frames:
    """Frames a message carries through untouched (another boundary's message, say)."""

    __slots__ = ("frames",)
    limit = 8  # most frames one message carries through

    def __init__(self, frames) -> None:
        self.frames = tuple(frames)

    def __iter__(self):
        return iter(self.frames)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index):
        return self.frames[index]

    def __eq__(self, other) -> bool:
        return isinstance(other, Frames) and [bytes(buffer_of(f)) for f in self] == [bytes(buffer_of(f)) for f in other]

    def __repr__(self) -> str:
        return f"Frames({len(self.frames)})"


class Message(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Base of every message: its subclasses are declared with `Boundary.message(command)`.

    Checks that need more than one field go in `__post_init__`, raising ValueError: it runs on
    every message received (and built), and the ValueError becomes a ProtocolError."""

    boundary: ClassVar[Boundary]
    command: ClassVar[enum.IntEnum]

    def to_frames(self) -> list:
        return self.boundary.encode(self)


class Refusal(Message, frozen=True):
    """Base of the error replies of the request/reply boundaries: which request, why, in words."""

    seq: U32  # the refused request's number (0 when it could not be read)
    code: ErrorCode
    message: Text


class Decision(Message, frozen=True):
    """Base of the messages that carry a decided token: the one after `position`, and its probability."""

    position: U32
    token: U32
    prob: float


class JobMessage(Message, frozen=True):
    """Base of the messages about one of the broker's jobs (an edge request on its way through the cloud)."""

    job: U64  # the broker's job number


def buffer_of(frame) -> memoryview:
    """The bytes of a frame received with copy=False (zmq.Frame) or copy=True (bytes)."""
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def pack_header(tag: bytes, version: int, command: int) -> bytes:
    return HEADER.pack(tag, version, int(command))


TENSOR_HEAD = struct.Struct("!BB")  # dtype code, ndim; then ndim x "!I"


def tensor_frames(array: np.ndarray) -> list:
    """[header, buffer] for a C-contiguous array; the buffer is the array's memory (zero copy)."""
    assert array.flags["C_CONTIGUOUS"], "tensor frames need a contiguous array"
    code = DTYPE_CODES[array.dtype.name]
    head = TENSOR_HEAD.pack(code, array.ndim) + struct.pack(f"!{array.ndim}I", *array.shape)
    if array.size == 0:  # a memoryview with a 0 in its shape cannot be cast to bytes
        return [head, b""]
    return [head, memoryview(array.reshape(-1).view(np.uint8))]  # bytes: a bfloat16 buffer has no format code


def tensor_from_frames(head_frame, data_frame, spec: TensorSpec) -> np.ndarray:
    """The array a (header, buffer) pair describes, viewing the frame's memory (no copy)."""
    head = buffer_of(head_frame)
    if len(head) < TENSOR_HEAD.size:
        raise ProtocolError("tensor header too short")
    code, ndim = TENSOR_HEAD.unpack(head[: TENSOR_HEAD.size])
    if code not in DTYPES:
        raise ProtocolError(f"unknown dtype code {code}")
    if ndim != spec.ndim or len(head) != TENSOR_HEAD.size + 4 * ndim:
        raise ProtocolError(f"tensor of rank {ndim} (header of {len(head)} bytes), expected rank {spec.ndim}")
    shape = struct.unpack(f"!{ndim}I", head[TENSOR_HEAD.size:])
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a numpy int64 product could wrap to 0
    if nbytes > spec.max_bytes:
        raise ProtocolError(f"tensor of {nbytes} bytes exceeds {spec.max_bytes}")
    data = buffer_of(data_frame)
    if len(data) != nbytes:
        raise ProtocolError(f"buffer of {len(data)} bytes, shape {shape} {dtype.name} needs {nbytes}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # shape as sent


class _Codec(threading.local):
    """Per thread: the frames an encode appends, or a decode takes, beside the body."""

    def __init__(self) -> None:
        self.side: list = []  # encode: frames after the body
        self.frames: list = []  # decode: the whole message
        self.cursor = 0  # decode: the next frame not taken yet
        self.tensors: list[TensorSpec] = []  # decode: the message type's tensor fields, in order
        self.taken = 0  # decode: tensor fields taken so far
        self.encoder = msgspec.msgpack.Encoder(enc_hook=_encode_side)


def _encode_side(value):
    """Tensors and carried frames leave the body: it holds only their place (a count)."""
    if isinstance(value, np.ndarray):
        _codec.side.extend(tensor_frames(value))
        return 0
    if isinstance(value, Frames):
        _codec.side.extend(value.frames)
        return len(value.frames)
    raise TypeError(f"a {type(value).__name__} cannot travel in a message")


def _decode_side(kind, value):
    c = _codec
    if kind is np.ndarray:
        if value != 0 or c.taken >= len(c.tensors) or c.cursor + 2 > len(c.frames):
            raise ProtocolError("a tensor field without its frames")
        spec = c.tensors[c.taken]
        array = tensor_from_frames(c.frames[c.cursor], c.frames[c.cursor + 1], spec)
        c.cursor += 2
        c.taken += 1
        return array
    if kind is Frames:
        if not isinstance(value, int) or not 1 <= value <= Frames.limit or c.cursor + value > len(c.frames):
            raise ProtocolError(f"carries {value!r} frames (1..{Frames.limit}, all present)")
        carried = Frames(c.frames[c.cursor:c.cursor + value])
        c.cursor += value
        return carried
    raise TypeError(f"no decoder for {kind}")


_codec = _Codec()


def _tensor_specs(cls: type) -> list[TensorSpec]:
    specs = []
    for field in msgspec.structs.fields(cls):
        if get_origin(field.type) is Annotated:
            specs.extend(m for m in get_args(field.type)[1:] if isinstance(m, TensorSpec))
    return specs


class Boundary:
    """One boundary's protocol: its tag, version, commands and the messages declared for them."""

    def __init__(self, tag: bytes, version: int, commands: type[enum.IntEnum]) -> None:
        assert len(tag) == 2, f"a boundary tag is two bytes, got {tag!r}"
        self.tag = tag
        self.version = version
        self.commands = commands
        self.messages: dict[enum.IntEnum, type[Message]] = {}
        self._decoders: dict[enum.IntEnum, msgspec.msgpack.Decoder] = {}
        self._tensors: dict[enum.IntEnum, list[TensorSpec]] = {}
        self._heads = {c: pack_header(tag, version, c) for c in commands}

    def message(self, command: enum.IntEnum):
        """Class decorator: the message type sent with `command` on this boundary."""
        assert command in self.commands and command not in self.messages, f"{command!r} declared twice or foreign"

        def register(cls: type[Message]) -> type[Message]:
            cls.boundary, cls.command = self, command
            self.messages[command] = cls
            self._decoders[command] = msgspec.msgpack.Decoder(cls, dec_hook=_decode_side)
            self._tensors[command] = _tensor_specs(cls)
            return cls

        return register

    def encode(self, msg: Message) -> list:
        _codec.side = side = []
        body = _codec.encoder.encode(msg)
        _codec.side = []
        return [self._heads[msg.command], body, *side]

    def decode(self, frames, allowed=None) -> Message:
        """The message `frames` hold, if its command is one of `allowed` (default: any)."""
        command = self._command(frames)
        if allowed is not None and command not in allowed:
            raise ProtocolError(f"command {command.name} is not expected here")
        if len(frames) < 2:
            raise ProtocolError(f"{command.name}: no body frame")
        body = buffer_of(frames[1])
        if len(body) > MAX_BODY:
            raise ProtocolError(f"{command.name}: body of {len(body)} bytes (at most {MAX_BODY})")
        c = _codec
        c.frames, c.cursor, c.tensors, c.taken = frames, 2, self._tensors[command], 0
        try:
            msg = self._decoders[command].decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, ProtocolError) as exc:
            raise ProtocolError(f"{command.name}: {exc}") from None
        finally:
            c.frames, c.tensors = [], []
        if c.taken != len(self._tensors[command]) or c.cursor != len(frames):
            raise ProtocolError(f"{command.name}: {len(frames)} frames, the fields account for {c.cursor}")
        return msg

    def _command(self, frames) -> enum.IntEnum:
        if not frames:
            raise ProtocolError("empty message")
        head = buffer_of(frames[0])
        if len(head) != HEADER.size:
            raise ProtocolError(f"header of {len(head)} bytes, expected {HEADER.size}")
        tag, version, command = HEADER.unpack(head)
        if tag != self.tag:
            raise ProtocolError(f"protocol tag {tag!r}, expected {self.tag!r}")
        if version != self.version:
            raise ProtocolError(f"protocol version {version}, this side speaks {self.version}")
        try:
            command = self.commands(command)
        except ValueError:
            raise ProtocolError(f"unknown command {command}") from None
        if command not in self.messages:
            raise ProtocolError(f"command {command.name} has no message on this boundary")
        return command
