"""Edge <-> cloud wire protocol (tag b"CE").

Request channel (edge DEALER, sent like REQ with an empty delimiter frame -> broker ROUTER):
HELLO -> WELCOME | ERROR, DECIDE -> TOKEN | ERROR, VERIFY -> TOKEN | ERROR. Upload channel
(edge PUSH -> content manager PULL, no replies): UPLOAD (rows as a tensor), UPLOAD_SHM (rows
already written into the device's shared-memory segment), END (the generation ended: release
the state).

`seq` numbers requests of a device; `session` names one generation's state on the cloud
(given by WELCOME: 64 random bits, so no one guesses another generation's); upload `seq`
numbers a session's uploads of one `epoch`, which must arrive in order. A HELLO carries the
edge's random `instance`: while one edge generates with a device id, another edge's HELLO for
it is refused IN_USE (unless it sets `take_over`).

The exact mode: uploads carry the edge's draft after each row (the token it went on with);
VERIFY folds the rows up to `position` and checks their drafts, and its TOKEN names the first
row whose draft was wrong, with the full model's token after it (the cloud has then rolled the
session back to row + 1 positions and begun the next epoch: uploads of an earlier epoch are
dropped), or `position` and the token after it.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from cecollm.wire.wire import U32, U64, Boundary, ComputeDtype, Decision, Message, Refusal, Tensor, Text, WireDtype

MAX_UPLOAD_BYTES = 64 << 20  # largest upload tensor accepted


Command = enum.IntEnum("Command", "HELLO WELCOME DECIDE TOKEN UPLOAD UPLOAD_SHM END ERROR VERIFY")  # 1, 2, ...


# 2: fields declared once (msgspec bodies); 3: the exact mode; 4: 64-bit sessions, HELLO's instance and take-over
# 5: HELLO's compute dtype, bfloat16 rows
EDGE = Boundary(b"CE", 5, Command)
NO_DRAFT = (1 << 32) - 1  # in an upload's drafts: the edge made no draft after this row
MAX_ROWS = 1 << 16  # most rows one upload carries
TAG, VERSION = EDGE.tag, EDGE.version

Exits = Annotated[tuple[U32, ...], msgspec.Meta(min_length=1, max_length=256)]
Drafts = Annotated[tuple[U32, ...], msgspec.Meta(max_length=MAX_ROWS)]


class DeviceMessage(Message, frozen=True):
    """A request of a device, or the reply to one: who, and which request."""

    device_id: U32
    seq: U32  # the device's request number; a reply carries its request's


class SessionMessage(Message, frozen=True):
    """An upload-channel message: which device and which of its sessions."""

    device_id: U32
    session: U64


class RowsMessage(SessionMessage, frozen=True):
    """Rows of a session arrived, in order: the session's upload number and the first position."""

    seq: U32  # the upload's number in its epoch, from 0
    start: U32


class DraftedRows(RowsMessage, frozen=True, kw_only=True):
    """Rows with the exact mode's fields (keyword-only: they come after each message's own)."""

    epoch: U32 = 0  # roll-backs of the session so far
    drafts: Drafts = ()  # the edge's token after each row (NO_DRAFT: none); () = no drafts (the paper's mode)


@EDGE.message(Command.HELLO)
class Hello(DeviceMessage, frozen=True):
    """First request of a generation: who the edge is and what it runs."""

    identity: Text  # LoadedModel.identity of the edge's model
    n_layers: U32
    exits: Exits
    upload_layer: U32
    dtype: ComputeDtype  # the model's compute dtype: edge and cloud must compute in the same
    wire_dtype: WireDtype  # of the uploaded rows: "float16" | "bfloat16" | "float32"
    shm: bool  # the edge will write rows into the device's shared-memory segment
    instance: U64 = 0  # random per edge process: a second edge with the same device id is told apart
    take_over: bool = False  # replace another edge's session of this device id instead of being refused


@EDGE.message(Command.WELCOME)
class Welcome(DeviceMessage, frozen=True):
    """The cloud opened a session for the device."""

    session: U64  # names this generation's state (random); uploads and requests carry it
    capacity: U32  # positions the state can hold
    rows_offset: U64  # where row `p` starts in the segment: rows_offset + p * hidden * itemsize
    segment: Text  # shared-memory segment name (the edge writes rows there when it asked for shm)


@EDGE.message(Command.DECIDE)
class Decide(DeviceMessage, frozen=True):
    """Ask the cloud for the token after `position`: no tensor, the rows went up already."""

    session: U64
    position: U32


@EDGE.message(Command.TOKEN)
class Token(Decision, frozen=True):
    """The cloud's token after `position`, for the device's request `seq`."""

    device_id: U32
    seq: U32
    cloud_seconds: float  # the worker's compute time for this request


@EDGE.message(Command.UPLOAD)
class Upload(DraftedRows, frozen=True, eq=False):
    """Upload-layer rows [start, start + n) of a session, rows [n, hidden] in the wire dtype."""

    rows: Tensor(2, MAX_UPLOAD_BYTES)  # [n, hidden]

    def __post_init__(self) -> None:
        if self.rows.shape[0] == 0:
            raise ValueError(f"rows must be [n >= 1, hidden], got shape {self.rows.shape}")
        check_drafts(self.drafts, self.rows.shape[0])


@EDGE.message(Command.UPLOAD_SHM)
class UploadShm(DraftedRows, frozen=True):
    """Rows [start, start + count) were written into the session's shared-memory segment."""

    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_ROWS)]

    def __post_init__(self) -> None:
        check_drafts(self.drafts, self.count)


@EDGE.message(Command.END)
class End(SessionMessage, frozen=True):
    """The generation ended: release the session's state."""


@EDGE.message(Command.VERIFY)
class Verify(DeviceMessage, frozen=True):
    """Check the drafts of the rows up to `position` (exact mode); TOKEN answers. No tensor either."""

    session: U64
    epoch: U32  # the session's epoch the edge is in: a request of an earlier one is stale
    position: U32


def check_drafts(drafts: tuple, rows: int) -> None:
    if drafts and len(drafts) != rows:
        raise ValueError(f"{len(drafts)} drafts for {rows} rows (one a row, or none)")


@EDGE.message(Command.ERROR)
class Error(Refusal, frozen=True):
    """A request was refused; `seq` is the request's (0 when it could not be read)."""


REQUESTS = (Command.HELLO, Command.DECIDE, Command.VERIFY)  # what the request channel carries from the edge
REPLIES = (Command.WELCOME, Command.TOKEN, Command.ERROR)
UPLOADS = (Command.UPLOAD, Command.UPLOAD_SHM, Command.END)  # what the upload channel carries
MESSAGES = EDGE.messages
parse = EDGE.decode
