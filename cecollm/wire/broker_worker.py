"""Broker <-> worker wire protocol (tag b"CW"), a Paranoid Pirate / Majordomo variant.

Worker DEALER -> broker ROUTER. A worker sends CONNECT; the broker answers CONFIG (what to
load and where the content manager is); the worker loads and sends READY, and from then on
HEARTBEATs both ways every interval while idle or busy (a beat thread of the worker keeps
beating while its main thread computes). The broker sends REQUEST (a job number plus the
edge's frames, untouched) to a free worker, several back to back for a batch (requests of different
devices it computes in one pass; a device's requests go to the worker that served it last); the worker answers REPLY
(the job number plus the frames for the edge), or DEFER (the job's lease must wait for rows
still in flight or for another worker: the broker parks the job and sends it out again when the
content manager says it may go). DISCONNECT tells a peer to go away; ERROR answers a message the
broker could not read.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from cecollm.wire.edge_cloud import Exits
from cecollm.wire.wire import U32, Boundary, ComputeDtype, Frames, JobMessage, Message, Text

Command = enum.IntEnum("Command", "CONNECT CONFIG READY HEARTBEAT REQUEST REPLY DISCONNECT ERROR DEFER")  # 1, 2, ...


# 2: fields declared once (msgspec bodies); 3: DEFER; 4: CONFIG's dtype; 5: batches (REQUEST's `left`)
WORKER = Boundary(b"CW", 5, Command)
MAX_BATCH = 256  # most requests in one batch
TAG, VERSION = WORKER.tag, WORKER.version


@WORKER.message(Command.CONNECT)
class Connect(Message, frozen=True):
    """A new worker asks for its configuration."""

    pid: U32  # the worker's process id, for log lines


@WORKER.message(Command.CONFIG)
class Config(Message, frozen=True):
    """What a worker serves: the model, its split, the content manager's address, the beat."""

    model_dir: Text  # transformers directory of the model (on this host)
    identity: Text  # the model's identity; the worker checks it
    dtype: ComputeDtype  # the compute dtype the worker loads the model in (the broker's --dtype)
    exits: Exits
    upload_layer: U32
    state_address: Text  # the content manager's control socket
    heartbeat_ms: U32
    liveness: U32  # beats missed before a peer is considered dead


@WORKER.message(Command.READY)
class Ready(Message, frozen=True):
    """The worker has loaded its model and takes requests."""


@WORKER.message(Command.HEARTBEAT)
class Heartbeat(Message, frozen=True):
    """I am alive (both ways, every interval)."""


@WORKER.message(Command.REQUEST)
class Request(JobMessage, frozen=True):
    """Job `job` for the worker: the edge's request frames, as the edge sent them. A batch is several
    REQUESTs sent back to back; `left` counts those still to come (0: the batch is complete)."""

    payload: Frames  # edge protocol frames
    left: Annotated[int, msgspec.Meta(ge=0, le=MAX_BATCH - 1)] = 0

    def __post_init__(self) -> None:
        _check_payload(self.payload)


@WORKER.message(Command.REPLY)
class Reply(JobMessage, frozen=True):
    """The answer to job `job`: frames for the edge."""

    payload: Frames

    def __post_init__(self) -> None:
        _check_payload(self.payload)


@WORKER.message(Command.DEFER)
class Defer(JobMessage, frozen=True):
    """Job `job` cannot be served yet (its lease must wait): the worker is free again."""


@WORKER.message(Command.DISCONNECT)
class Disconnect(Message, frozen=True):
    """Go away (the broker shuts down, or does not know this worker)."""


@WORKER.message(Command.ERROR)
class Error(Message, frozen=True):
    """A message the broker could not read or did not expect."""

    message: Text


def _check_payload(payload) -> None:
    assert isinstance(payload, Frames), f"a carried payload is wire.Frames, got {type(payload).__name__}"


MESSAGES = WORKER.messages
parse = WORKER.decode
