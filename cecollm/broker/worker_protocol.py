"""Broker <-> worker wire protocol (tag b"CW"), a Paranoid Pirate / Majordomo variant.

Worker DEALER -> broker ROUTER. A worker sends CONNECT; the broker answers CONFIG (what to
load and where the content manager is); the worker loads and sends READY, and from then on
HEARTBEATs both ways every interval while idle or busy (a beat thread of the worker keeps
beating while its main thread computes). The broker sends REQUEST (a job number plus the
edge's frames, untouched) to the least recently used ready worker; the worker answers REPLY
(the job number plus the frames for the edge). DISCONNECT tells a peer to go away; ERROR
answers a message the broker could not read.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import orjson

from cecollm.broker.wire import (
    ProtocolError, decode_json, decode_text, expect_frames, json_field, pack_header, parse_header, unpack_fixed,
)

TAG = b"CW"
VERSION = 1
MAX_PAYLOAD_FRAMES = 8  # edge frames a REQUEST or REPLY may carry


class Command(enum.IntEnum):
    CONNECT = 1
    CONFIG = 2
    READY = 3
    HEARTBEAT = 4
    REQUEST = 5
    REPLY = 6
    DISCONNECT = 7
    ERROR = 8


def _head(command: Command) -> bytes:
    return pack_header(TAG, VERSION, command)


@dataclass(frozen=True)
class Connect:
    """A new worker asks for its configuration."""

    pid: int  # the worker's process id, for log lines

    _FIELDS = struct.Struct("!I")

    def to_frames(self) -> list:
        return [_head(Command.CONNECT), self._FIELDS.pack(self.pid)]

    @classmethod
    def from_frames(cls, frames) -> "Connect":
        expect_frames(frames, 2, "CONNECT")
        return cls(*unpack_fixed(cls._FIELDS, frames[1], "CONNECT"))


@dataclass(frozen=True)
class Config:
    """What a worker serves: the model, its split, the content manager's address, the beat."""

    model_dir: str  # transformers directory of the model (on this host)
    identity: str  # the model's identity; the worker checks it
    exits: tuple[int, ...]
    upload_layer: int
    state_address: str  # the content manager's control socket
    heartbeat_ms: int
    liveness: int  # beats missed before a peer is considered dead

    def to_frames(self) -> list:
        body = dict(model_dir=self.model_dir, identity=self.identity, exits=list(self.exits),
                    upload_layer=self.upload_layer, state_address=self.state_address,
                    heartbeat_ms=self.heartbeat_ms, liveness=self.liveness)
        return [_head(Command.CONFIG), orjson.dumps(body)]

    @classmethod
    def from_frames(cls, frames) -> "Config":
        expect_frames(frames, 2, "CONFIG")
        body = decode_json(frames[1], "CONFIG")
        exits = body.get("exits")
        if not isinstance(exits, list) or not all(isinstance(e, int) for e in exits):
            raise ProtocolError("CONFIG: exits must be a list of integers")
        return cls(json_field(body, "model_dir", str, "CONFIG"), json_field(body, "identity", str, "CONFIG"),
                   tuple(exits), json_field(body, "upload_layer", int, "CONFIG"),
                   json_field(body, "state_address", str, "CONFIG"), json_field(body, "heartbeat_ms", int, "CONFIG"),
                   json_field(body, "liveness", int, "CONFIG"))


@dataclass(frozen=True)
class Ready:
    """The worker has loaded its model and takes requests."""

    def to_frames(self) -> list:
        return [_head(Command.READY)]

    @classmethod
    def from_frames(cls, frames) -> "Ready":
        expect_frames(frames, 1, "READY")
        return cls()


@dataclass(frozen=True)
class Heartbeat:
    def to_frames(self) -> list:
        return [_head(Command.HEARTBEAT)]

    @classmethod
    def from_frames(cls, frames) -> "Heartbeat":
        expect_frames(frames, 1, "HEARTBEAT")
        return cls()


@dataclass(frozen=True)
class Request:
    """Job `job` for the worker: the edge's request frames, as the edge sent them."""

    job: int
    payload: tuple  # edge protocol frames

    _FIELDS = struct.Struct("!Q")

    def to_frames(self) -> list:
        return [_head(Command.REQUEST), self._FIELDS.pack(self.job), *self.payload]

    @classmethod
    def from_frames(cls, frames) -> "Request":
        return cls(*_job_and_payload(cls._FIELDS, frames, "REQUEST"))


@dataclass(frozen=True)
class Reply:
    """The answer to job `job`: frames for the edge."""

    job: int
    payload: tuple

    _FIELDS = struct.Struct("!Q")

    def to_frames(self) -> list:
        return [_head(Command.REPLY), self._FIELDS.pack(self.job), *self.payload]

    @classmethod
    def from_frames(cls, frames) -> "Reply":
        return cls(*_job_and_payload(cls._FIELDS, frames, "REPLY"))


@dataclass(frozen=True)
class Disconnect:
    def to_frames(self) -> list:
        return [_head(Command.DISCONNECT)]

    @classmethod
    def from_frames(cls, frames) -> "Disconnect":
        expect_frames(frames, 1, "DISCONNECT")
        return cls()


@dataclass(frozen=True)
class Error:
    message: str

    def to_frames(self) -> list:
        return [_head(Command.ERROR), self.message.encode()[:1000]]

    @classmethod
    def from_frames(cls, frames) -> "Error":
        expect_frames(frames, 2, "ERROR")
        return cls(decode_text(frames[1], "ERROR"))


def _job_and_payload(layout: struct.Struct, frames, what: str):
    if not 3 <= len(frames) <= 2 + MAX_PAYLOAD_FRAMES:
        raise ProtocolError(f"{what}: {len(frames)} frames, expected 3..{2 + MAX_PAYLOAD_FRAMES}")
    (job,) = unpack_fixed(layout, frames[1], what)
    return job, tuple(frames[2:])


MESSAGES = {Command.CONNECT: Connect, Command.CONFIG: Config, Command.READY: Ready, Command.HEARTBEAT: Heartbeat,
            Command.REQUEST: Request, Command.REPLY: Reply, Command.DISCONNECT: Disconnect, Command.ERROR: Error}


def parse(frames, allowed=tuple(Command)):
    command = parse_header(frames, TAG, VERSION, Command)
    if command not in allowed:
        raise ProtocolError(f"command {command.name} is not expected here")
    return MESSAGES[command].from_frames(frames)
