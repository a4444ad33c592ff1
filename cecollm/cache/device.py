"""One device's record in the content manager: its session's segment and what it holds.

The record checks what an edge uploads (in order, within the session's capacity and dtype, of
the current epoch) and whether a worker's lease may be granted now, keeps the exact mode's drafts
beside the rows, and rolls the session back when a verifying worker found a wrong draft. It sends
nothing: the content manager does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from cecollm.cache import shm
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.wire import DTYPE_CODES, DTYPES, ErrorCode, ProtocolError


@dataclass
class Watcher:
    """A request the broker parked (its lease had to wait): ARRIVED goes to `peer` when it may go."""

    peer: bytes  # the broker's routing id on the state socket
    job: int  # the broker's job number
    seq: int  # the edge request's seq
    position: int  # the request's position
    since: float


class StaleUpload(Exception):
    """Rows of an epoch the session has rolled back from: dropped, the session goes on."""


@dataclass
class DeviceState:
    """What the manager holds for one device's current session."""

    device_id: int
    session: int  # 64 random bits: names this generation's state
    wire_code: int
    layout: shm.StateLayout
    segment: SharedMemory
    received: int = 0  # rows received: positions [0, received)
    folded: int = 0  # positions in the KV cache; their rows are dropped
    epoch: int = 0  # roll-backs so far (exact mode): uploads name the epoch they belong to
    upload_seq: int = 0  # the next upload's expected seq in this epoch
    drafts: np.ndarray = field(default=None, repr=False)  # [capacity] the edge's token after each row (NO_DRAFT),
    #                                                        a view of the segment's header page
    header: np.ndarray = field(default=None, repr=False)  # the segment's header words (shm.LEASE, RECEIVED, EPOCH)
    lease_token: int = 0  # 0: no lease; else the lease's holder (computing until lease_expires, or keeping it)
    lease_seq: int = 0  # the edge request the lease serves
    lease_expires: float = 0.0  # a lease computes until then; 0: none computing (a kept lease waits for the next)
    answer_seq: int = 0  # the edge request the last commit served...
    answer: sp.Decided | None = None  # ...and its token, for a retry of that request
    last_used: float = field(default_factory=time.monotonic)
    broken: str | None = None  # why an upload was refused (the session cannot go on)
    watchers: list[Watcher] = field(default_factory=list)
    stale_uploads: int = 0  # uploads of an earlier epoch, dropped
    owner: int = 0  # the instance of the edge that opened the session (HELLO's)

    def __post_init__(self) -> None:
        self.drafts = shm.drafts(self.segment.buf, self.layout)
        self.drafts[:] = ep.NO_DRAFT
        self.header = shm.header(self.segment.buf)
        self.header[:] = 0

    def leased(self, now: float) -> bool:
        """Whether a worker computes on the device now (a kept lease between requests does not)."""
        return self.lease_token != 0 and now < self.lease_expires

    def grant(self, token: int, seq: int, expires: float) -> None:
        """A worker computes on the device until `expires` (or its commit); the header names its lease."""
        self.lease_token, self.lease_seq, self.lease_expires = token, seq, expires
        self.header[shm.LEASE] = token

    def close(self) -> None:
        """The session ends: a worker keeping its lease sees the header's lease gone; the views are dropped
        (the segment can then be closed)."""
        self.header[shm.LEASE] = 0
        self.header = self.drafts = None

    def may_go(self, seq: int, position: int, now: float) -> bool:
        """Whether the parked request `seq` up to `position` would now get an answer from its lease (a grant,
        the answer it got already, or a refusal that is final) rather than NOT_YET."""
        if self.broken is not None or position < self.folded or (self.answer and self.answer_seq == seq):
            return True
        return position < self.received and (not self.leased(now) or self.lease_seq == seq)

    def refusal(self, msg: sp.Lease, now: float, kv_dtype: str):
        """Why the lease `msg` cannot be granted now: (code, message), the answer a retried request already got,
        or None. `kv_dtype`: the cloud's KV cache dtype (a remote worker gets the KV only in a wire dtype)."""
        if msg.position >= self.layout.capacity:
            return ErrorCode.CAPACITY, f"position {msg.position} is beyond the capacity of {self.layout.capacity} positions"
        if self.answer and self.answer_seq == msg.seq:
            return self.answer
        if msg.verify and msg.epoch != self.epoch:
            return ErrorCode.STALE, (f"epoch {msg.epoch} is over: the session rolled back to {self.folded} positions "
                                     f"(epoch {self.epoch})")
        if msg.position < self.folded:
            return ErrorCode.STALE, f"position {msg.position} was already decided"
        if msg.remote and kv_dtype not in DTYPE_CODES:
            return ErrorCode.INTERNAL, (f"a {kv_dtype} KV cache cannot travel to a remote worker "
                                        "(float16 and float32 only)")
        if self.broken:
            return ErrorCode.MISSING, f"device {self.device_id}: {self.broken}"
        if msg.position >= self.received:
            return ErrorCode.NOT_YET, f"position {msg.position} not received yet (have {self.received})"
        if self.leased(now) and self.lease_seq != msg.seq:  # the same request again (its worker died) supersedes
            return ErrorCode.NOT_YET, "another request of the device is being computed"
        return None

    # ---- uploads ---------------------------------------------------------------------
    def take_rows(self, msg: ep.Upload | ep.UploadShm, count: int) -> None:
        """Check an upload and note its rows and drafts (an UPLOAD's rows are copied into the segment)."""
        if msg.epoch < self.epoch:
            self.stale_uploads += 1
            raise StaleUpload(f"device {self.device_id}: rows of epoch {msg.epoch}, the session is in {self.epoch}")
        problem = None
        if self.broken:
            problem = f"session already broken ({self.broken})"
        elif msg.epoch > self.epoch:
            problem = f"upload of epoch {msg.epoch}, the session is in {self.epoch}"
        elif msg.seq != self.upload_seq:
            problem = f"upload seq {msg.seq}, expected {self.upload_seq}"
        elif msg.start != self.received:
            problem = f"upload starts at position {msg.start}, expected {self.received}"
        elif msg.start + count > self.layout.capacity:
            problem = f"rows up to {msg.start + count} exceed the capacity of {self.layout.capacity} positions"
        elif isinstance(msg, ep.Upload):
            rows = msg.rows
            if rows.dtype != DTYPES[self.wire_code] or rows.shape[1] != self.layout.hidden:
                problem = (f"rows {rows.dtype.name} {rows.shape} do not fit {DTYPES[self.wire_code].name} "
                           f"[n, {self.layout.hidden}]")
        if problem:
            self.broken = self.broken or problem
            raise ProtocolError(f"device {self.device_id}: {problem}")
        if isinstance(msg, ep.Upload):
            begin, _ = self.layout.rows_span(msg.start, msg.start + count)
            target = np.ndarray(msg.rows.shape, dtype=msg.rows.dtype, buffer=self.segment.buf, offset=begin)
            target[:] = msg.rows  # [n, hidden]: the one copy, from the frame into shared memory
        if msg.drafts:
            self.drafts[msg.start:msg.start + count] = msg.drafts
        self.upload_seq += 1
        self.received += count
        self.header[shm.RECEIVED] = self.received  # after the rows and drafts: a worker reading it finds them

    def pending_drafts(self) -> tuple[int, ...]:
        """The drafts of the rows not yet folded, [folded, received), for a verifying grant."""
        return tuple(int(d) for d in self.drafts[self.folded:self.received])

    # ---- leases ending -------------------------------------------------------------------
    def end_lease(self, end: sp.LeaseEnd) -> None:
        """The lease's work is in: `folded` positions in the KV, `decided` the token after the last. A kept
        lease stays with its worker (no longer computing)."""
        seq = end.seq or self.lease_seq
        if end.folded > self.folded:
            self.answer_seq, self.answer = seq, sp.Decided(end.folded - 1, end.decided, end.prob)
        self.folded = end.folded
        self.lease_expires = 0.0
        if not end.keep:
            self.lease_token = 0
            self.header[shm.LEASE] = 0
        self.last_used = time.monotonic()
        shm.drop_pages(self.segment, *self.layout.dropped_pages(self.folded))

    def roll_back(self, end: sp.Rollback) -> None:
        """A verifying lease found the draft after row folded - 1 wrong: the session keeps `folded`
        positions and begins its next epoch; later rows and drafts are gone."""
        self.end_lease(end)
        self.answer_seq, self.answer = end.seq or self.lease_seq, sp.Decided(end.folded - 1, end.decided, end.prob)
        self.received = end.folded
        self.drafts[end.folded:] = ep.NO_DRAFT
        self.epoch += 1
        self.upload_seq = 0
        self.header[shm.EPOCH] = self.epoch
        self.header[shm.RECEIVED] = self.received
