"""Cloud processes <-> content manager wire protocol (tag b"CS").

Worker DEALER (sent like REQ, with an empty delimiter) -> content manager ROUTER.
OPEN -> OPENED: a device starts a generation (a new session, a new shared-memory segment); a
device id another edge is generating with is refused IN_USE unless the OPEN takes over.
LEASE -> GRANT: the worker may compute on the device's state until COMMIT. A lease never waits:
when the rows up to the position have not arrived, or another worker holds the device, the
answer is ERROR NOT_YET at once and the worker hands the request back to the broker, which parks
it (so a request for rows that never come holds no worker). COMMIT (one way, no reply): the
state now holds `folded` positions in its KV, the lease ends, and the token decided for the last
of them is noted; a commit for a lease that is no longer current is only logged (the request
went to another worker, which computes the same). LEASE -> DECIDED: the request was already
served (its worker committed, then died before its reply got out): the noted token, nothing to
compute. A lease for a position already decided is refused STALE. OPEN and LEASE may be answered
with ERROR (codes from wire.ErrorCode); so is a message that cannot be read. Workers on the
content manager's host compute in the segment: no tensor crosses this socket for them.

The broker's own DEALER on the same socket: WATCH asks to hear ARRIVED (one way, no reply to the
WATCH itself) once a parked request's lease would be answered otherwise than NOT_YET: its rows are
in and no other request holds the device, or it was answered already, or it will be refused for
good (session gone or broken, position decided); the request then learns which from its lease.

Kept leases: a worker on this host ends its work with a COMMIT with
`keep`: the lease stays with it, so the device's next requests (which the broker sends to the same
worker) are served without asking. The content manager writes the current lease's token, the rows
received, the epoch and the drafts into the segment's header (shm.py); the worker reads them there,
and goes back to LEASE when they do not fit its lease (another worker took the device over: any
LEASE of another request takes a kept lease over; the session ended or was evicted: the header's
lease is then 0). Each COMMIT with `keep` still tells the content manager what is folded and the
token decided, for retries, watches and page dropping.

A remote worker (another host: it cannot map the segment) sets LEASE's `remote` flag. Its grant is a
STATE_GRANT: the lease's numbers plus the state as tensors, the KV cache's filled part (positions
[0, folded) of every cloud layer) and the received rows not yet folded. It ends the lease with
STATE_COMMIT, a call: the KV entries it appended (positions [from, folded) of every cloud layer), which the
manager checks against the device's state and writes into the segment, answering COMMITTED or ERROR.

The exact mode: a verifying LEASE (`verify`, the edge's `epoch`) is granted with the drafts of the
rows to check; a lease that finds a wrong draft ends with ROLLBACK (STATE_COMMIT with `rollback`
for a remote worker), a call: the content manager cuts the session back, begins its next epoch,
and answers COMMITTED before the worker answers the edge, so the edge's uploads of the new epoch
never reach it first.

Metrics (`cecollm-broker --metrics`): the broker asks STATS (one way) every half second on its
DEALER, and the content manager answers SNAPSHOT: the sessions it holds, their bytes, and its
counters since it started (evictions, uploads, refused frames). The broker exports them; a
SNAPSHOT names the content manager's pid, so the counters of one that died are kept, not reset.
"""

from __future__ import annotations

import enum

from cecollm.wire.edge_cloud import Drafts, check_drafts
from cecollm.wire.wire import DTYPE_CODES, DTYPES, U8, U32, U64, Boundary, Decision, ErrorCode, JobMessage, Message, Tensor, Text

MAX_STATE_BYTES = 1 << 31  # largest KV or rows tensor a remote grant or commit may carry


Command = enum.IntEnum(  # 1, 2, ...
    "Command", "OPEN OPENED LEASE GRANT COMMIT ERROR DECIDED STATE_GRANT STATE_COMMIT COMMITTED ROLLBACK WATCH ARRIVED "
    "STATS SNAPSHOT")


# 2: COMMIT carries the decided token; DECIDED. 3: remote workers (LEASE flag, STATE_GRANT, ...).
# 4: fields declared once (msgspec bodies). 5: the exact mode (verifying leases, ROLLBACK).
# 6: 64-bit sessions, OPEN's instance and take-over, leases that never wait (NOT_YET, WATCH, ARRIVED).
# 7: STATS and SNAPSHOT (the broker's metrics). 8: bfloat16 rows and KV tensors (wire dtype code 3).
# 9: kept leases (COMMIT's keep and seq).
STATE = Boundary(b"CS", 9, Command)
TAG, VERSION = STATE.tag, STATE.version
KV = Tensor(4, MAX_STATE_BYTES)  # [cloud_layers * 2, n_kv, positions, head_dim], model dtype


def _check_wire_code(code: int) -> None:
    if code not in DTYPES:
        raise ValueError(f"unknown wire dtype code {code} (known: {', '.join(map(str, DTYPES))})")


def _check_kv(kv, positions: int) -> None:
    if kv.shape[2] != positions or kv.shape[0] % 2:
        raise ValueError(f"KV must be [layers * 2, kv heads, {positions}, head dim], got {kv.shape}")


@STATE.message(Command.OPEN)
class Open(Message, frozen=True):
    """A device starts a generation: a new session and segment, for rows of this wire dtype."""

    device_id: U32
    wire_code: U8  # wire.DTYPES code of the rows the edge uploads
    instance: U64 = 0  # the edge's random instance (HELLO's): the same edge may reopen its device's session
    take_over: bool = False  # replace another instance's session of this device instead of being refused


@STATE.message(Command.OPENED)
class Opened(Message, frozen=True):
    """The session is open: its number, capacity, and where its rows start in the segment."""

    session: U64
    capacity: U32
    rows_offset: U64  # byte offset of row 0 in the segment
    segment: Text


@STATE.message(Command.LEASE)
class Lease(Message, frozen=True):
    """May this worker compute the device's request `seq` up to `position`? Answered at once: GRANT,
    DECIDED, or ERROR (NOT_YET when it must wait)."""

    device_id: U32
    session: U64
    seq: U32  # the edge request's seq: a re-dispatched request supersedes its own older lease
    position: U32
    remote: bool = False  # the worker cannot map the segment: grant the state as tensors (STATE_GRANT)
    verify: bool = False  # exact mode: the grant carries the drafts of the rows to check
    epoch: U32 = 0  # the session's epoch the request was made in: another one is stale


@STATE.message(Command.GRANT)
class Grant(Message, frozen=True):
    """Yes: compute in the segment until COMMIT names this lease."""

    token: U64  # the lease; COMMIT names it
    folded: U32  # positions already in the KV cache
    received: U32  # rows received (> the requested position)
    capacity: U32
    wire_code: U8
    segment: Text
    drafts: Drafts = ()  # a verifying lease: the edge's token after each row [folded, received) (NO_DRAFT: none)

    def __post_init__(self) -> None:
        _check_wire_code(self.wire_code)
        check_drafts(self.drafts, self.received - self.folded)


class LeaseEnd(Message, frozen=True):
    """Base of COMMIT and ROLLBACK: the lease's work is in, `folded` positions in the KV, and the token
    decided after the last of them for the device's request `seq`."""

    device_id: U32
    token: U64  # the lease
    folded: U32
    decided: U32  # the token decided after position folded - 1
    prob: float  # its probability
    seq: U32 = 0  # the edge request served (a retry of it gets DECIDED); 0: the lease's own
    keep: bool = False  # the worker keeps the lease for the device's next requests (it holds the device)


@STATE.message(Command.COMMIT)
class Commit(LeaseEnd, frozen=True):
    """The lease's work is in (one way, no reply); without `keep` the lease ends."""


@STATE.message(Command.ROLLBACK)
class Rollback(LeaseEnd, frozen=True):
    """A verifying lease ends at a wrong draft (a call, answered COMMITTED): the KV holds `folded`
    positions, the draft after row folded - 1 was wrong, the session goes back to `folded` positions
    and its next epoch, and `decided` is the full model's token there."""


@STATE.message(Command.STATE_GRANT)
class StateGrant(Message, frozen=True, eq=False):
    """A remote worker's grant: the lease and the device's state, carried as tensors."""

    token: U64  # the lease; STATE_COMMIT names it
    folded: U32  # positions already in the KV cache
    received: U32  # rows received (> the requested position)
    capacity: U32
    kv: KV  # [cloud_layers * 2, n_kv, folded, head_dim], model dtype: the filled KV
    rows: Tensor(2, MAX_STATE_BYTES)  # [received - folded, hidden], wire dtype: rows not yet folded
    drafts: Drafts = ()  # a verifying lease: the edge's token after each of those rows

    def __post_init__(self) -> None:
        if not self.folded < self.received <= self.capacity:
            raise ValueError(f"folded {self.folded}, received {self.received}, capacity {self.capacity} "
                             "(need folded < received <= capacity)")
        _check_kv(self.kv, self.folded)
        if self.rows.shape[0] != self.received - self.folded:
            raise ValueError(f"rows must be [{self.received - self.folded}, hidden], got {self.rows.shape}")
        check_drafts(self.drafts, self.received - self.folded)

    @property
    def wire_code(self) -> int:
        return DTYPE_CODES[self.rows.dtype.name]


@STATE.message(Command.STATE_COMMIT)
class StateCommit(Message, frozen=True, eq=False):
    """A remote worker ends its lease: the KV entries of positions [start, folded) it computed."""

    device_id: U32
    token: U64  # the lease
    start: U32  # the grant's folded
    folded: U32
    decided: U32  # the token decided after position folded - 1
    prob: float
    kv: KV  # [cloud_layers * 2, n_kv, folded - start, head_dim], model dtype
    rollback: bool = False  # a draft after row folded - 1 was wrong: the session goes back to `folded` positions

    def __post_init__(self) -> None:
        if self.folded <= self.start:
            raise ValueError(f"folded {self.folded} must be beyond start {self.start}")
        _check_kv(self.kv, self.folded - self.start)


@STATE.message(Command.COMMITTED)
class Committed(Message, frozen=True):
    """The content manager took a STATE_COMMIT: the device's KV now holds `folded` positions."""

    folded: U32


@STATE.message(Command.DECIDED)
class Decided(Decision, frozen=True):
    """The answer a committed request already got (LEASE of a request that was retried)."""


@STATE.message(Command.WATCH)
class Watch(JobMessage, frozen=True):
    """The broker parked job `job`, the device's request `seq` up to `position`: say ARRIVED when its
    lease would get an answer other than NOT_YET (granted, already answered, or refused for good)."""

    device_id: U32
    session: U64
    seq: U32  # the edge request's seq: a lease it holds already, or its noted answer, lets it go at once
    position: U32


@STATE.message(Command.ARRIVED)
class Arrived(JobMessage, frozen=True):
    """The parked job `job` may go to a worker again."""


@STATE.message(Command.STATS)
class Stats(Message, frozen=True):
    """The broker asks for the content manager's SNAPSHOT (for its metrics)."""


@STATE.message(Command.SNAPSHOT)
class Snapshot(Message, frozen=True):
    """What the content manager holds now, and its counters since it started."""

    pid: U32  # the content manager's process: another pid is another content manager, counting from 0
    devices: U32  # sessions held
    used_bytes: U64  # their segments together
    evictions: U64  # sessions released to make room in the byte budget
    idle_releases: U64  # sessions released after the idle TTL
    uploads_taken: U64  # upload-socket messages taken (rows or END)
    uploads_refused: U64  # ...refused: unreadable, another device's key, a session not open, rows out of order
    uploads_stale: U64  # ...dropped: rows of an epoch the session rolled back from
    upload_network_bytes: U64  # row bytes taken from UPLOAD frames
    upload_shm_bytes: U64  # row bytes the edge wrote into segments (UPLOAD_SHM)
    refused_upload_frames: U64  # upload-socket messages that did not parse
    refused_state_frames: U64  # state-socket messages that did not parse (or had no envelope)


@STATE.message(Command.ERROR)
class Error(Message, frozen=True):
    """An OPEN, LEASE or STATE_COMMIT was refused, or a message could not be read: why."""

    code: ErrorCode
    message: Text


REQUESTS = (Command.OPEN, Command.LEASE, Command.COMMIT, Command.STATE_COMMIT, Command.ROLLBACK, Command.WATCH,
            Command.STATS)
REPLIES = (Command.OPENED, Command.GRANT, Command.DECIDED, Command.ERROR, Command.STATE_GRANT, Command.COMMITTED)
MESSAGES = STATE.messages
parse = STATE.decode
