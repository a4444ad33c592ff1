"""Edge <-> stateless baseline cloud wire protocol (tag b"BL"), for the benchmark's baselines.

One request channel (edge DEALER, sent like REQ with an empty delimiter -> server ROUTER):
- GENERATE(prompt ids, max_new_tokens) -> RESPONSE(token ids, cloud seconds) | ERROR:
  the cloud-based deployment (the cloud runs the whole model).
- DECIDE_FULL(every upload-layer row [n, hidden], float16 or float32) -> TOKEN | ERROR: the
  cloud keeps nothing; it runs its layers over all rows and returns the token after the last.

Messages are declared with the wire's Message base like every other boundary's; token ids
travel in the body as an array of integers. Nothing a peer sent is unpickled.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from cecollm.wire.wire import U32, Boundary, Message, Refusal, Tensor

MAX_IDS = 8192  # most token ids one message carries (the body stays under the wire's MAX_BODY)
MAX_ROWS_BYTES = 256 << 20  # largest DECIDE_FULL tensor accepted


Command = enum.IntEnum("Command", "GENERATE RESPONSE DECIDE_FULL TOKEN ERROR")  # 1, 2, ...


BASELINE = Boundary(b"BL", 2, Command)  # 2: fields declared once (msgspec bodies)
TAG, VERSION = BASELINE.tag, BASELINE.version

Ids = Annotated[tuple[U32, ...], msgspec.Meta(max_length=MAX_IDS)]


@BASELINE.message(Command.GENERATE)
class Generate(Message, frozen=True):
    """Run the whole model on `prompt_ids` and return up to `max_new_tokens` greedy tokens."""

    seq: U32
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_IDS)]
    prompt_ids: Annotated[tuple[U32, ...], msgspec.Meta(min_length=1, max_length=MAX_IDS)]


@BASELINE.message(Command.RESPONSE)
class Response(Message, frozen=True):
    """The generated token ids and the cloud's compute time for them."""

    seq: U32
    token_ids: Ids
    cloud_seconds: float


@BASELINE.message(Command.DECIDE_FULL)
class DecideFull(Message, frozen=True, eq=False):
    """Every upload-layer row of the sequence so far, [n, hidden]; the token after row n-1 is wanted."""

    seq: U32
    rows: Tensor(2, MAX_ROWS_BYTES)  # [n, hidden], float16 or float32

    def __post_init__(self) -> None:
        if self.rows.shape[0] == 0 or self.rows.shape[1] == 0:
            raise ValueError(f"rows must be [n >= 1, hidden >= 1], got shape {self.rows.shape}")


@BASELINE.message(Command.TOKEN)
class Token(Message, frozen=True):
    """The token after the last row, its probability, and the cloud's compute time."""

    seq: U32
    token: U32
    prob: float
    cloud_seconds: float


@BASELINE.message(Command.ERROR)
class Error(Refusal, frozen=True):
    """A request was refused; `seq` is the request's (0 when it could not be read)."""


REQUESTS = (Command.GENERATE, Command.DECIDE_FULL)
REPLIES = (Command.RESPONSE, Command.TOKEN, Command.ERROR)
MESSAGES = BASELINE.messages
parse = BASELINE.decode
