"""What a cloud worker does with a batch of edge requests, on state the content manager holds.

HELLO: check the edge runs the same model and split, open a session. DECIDE and VERIFY: lease the
device, attach its shared-memory segment and fold the rows up to the position into the KV cache
there (in place), for every request of the batch in one pass (batch.py); commit (one way, sent when the worker is idle) and
answer the token. A worker on the content manager's host keeps its lease after the commit: the
broker sends the device's next requests to the same worker, which serves them without asking the
content manager, as long as the segment's header says the lease is still its own (shm.py); so a
token costs no call to the content manager. A lease that must wait (NOT_YET: rows still in flight,
or another worker computes on the device) makes the request go back to the broker, which parks it:
no worker waits. Segments stay mapped between requests (no map, unmap and page faults per token);
sweep() unmaps those the content manager has released, so their memory goes back.

A remote service (a worker on another host than the content manager) never touches shared memory: its
lease asks for the state as tensors (the filled KV and the rows not yet folded), it folds them in a KV
cache of its own for this one request (in the batch with the others), and commits the KV entries it
appended (a call the content manager answers), so the state still lives in the content manager only.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from cecollm.cache import shm
from cecollm.cache.kv import KVCache
from cecollm.cloud.batch import BatchFolder, Fold, Verdict
from cecollm.dtypes import from_numpy, to_numpy
from cecollm.layers import DecoderRunner
from cecollm.split import Split
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.dispatch import Dispatcher
from cecollm.wire.rpc import CallTimeout, RpcSocket
from cecollm.wire.wire import DTYPE_CODES, DTYPES, ErrorCode, ProtocolError, clip

log = logging.getLogger(__name__)

MAX_WAITING_COMMITS = 64  # commits that wait for an idle moment at most...
COMMIT_SECONDS = 0.05  # ...and for at most this long
MAPPED_SEGMENTS = 256  # device segments a worker keeps mapped at most (least recently used unmapped first)


class Refused(Exception):
    """The request cannot be served; carries the error code for the edge."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CloudService:
    """Serves edge requests for one model and split; holds no device state itself."""

    def __init__(self, runner: DecoderRunner, split: Split, identity: str, state: RpcSocket,
                 state_timeout: float = 10.0, remote: bool = False) -> None:
        self.runner = runner
        self.remote = remote  # state as tensors over the socket, never a shared-memory segment
        self.split = split
        self.identity = identity
        self.state = state
        self.state_timeout = state_timeout
        self.layout_base = dict(cloud_layers=split.n_layers - split.upload_layer, n_kv_heads=runner.n_kv_heads,
                                head_dim=runner.head_dim, hidden=runner.hidden_size,
                                kv_itemsize=runner.embed.weight.element_size())
        self.segments: OrderedDict[str, shm.Attachment] = OrderedDict()  # mapped, least recently used first
        self.held: dict[int, HeldLease] = {}  # device id -> the lease kept on it (a local worker)
        self.folder = BatchFolder(runner, split)
        self.commits: list[sp.Commit] = []  # commits not sent yet (the worker sends them when idle)
        self.commits_since = 0.0  # time.monotonic() of the oldest of them
        self.requests = Dispatcher({ep.Hello: self.hello, ep.Decide: self.decide, ep.Verify: self.verify})

    def close(self) -> None:
        for name in list(self.segments):
            self._unmap(name)
        self.state.close()

    def sweep(self) -> None:
        """Unmap segments whose device state was released (their file is gone from /dev/shm)."""
        for name in list(self.segments):
            if not os.path.exists(shm.SHM_DIR / name):
                self._unmap(name)
        for device_id, held in list(self.held.items()):
            if held.segment not in self.segments:
                self._drop(device_id)

    def _segment(self, name: str) -> shm.Attachment:
        try:
            seg = self.segments.pop(name, None) or shm.attach(name)
        except FileNotFoundError:
            raise Refused(ErrorCode.INTERNAL, f"the device's segment {name} is not in {shm.SHM_DIR} here: a worker on "
                          "another host than the broker's must run with --remote") from None
        self.segments[name] = seg
        while len(self.segments) > MAPPED_SEGMENTS:
            self._unmap(next(iter(self.segments)))
        return seg

    def _unmap(self, name: str) -> None:
        try:
            self.segments[name].close()
        except BufferError:  # a traceback still holds tensors over it: unmapped when collected
            pass
        del self.segments[name]

    def handle(self, frames) -> list | None:
        """Frames of the reply to the edge request `frames`, or None when its lease must wait (the
        broker parks it); never raises for bad input. Its commit is sent before it returns."""
        reply = self.handle_batch([frames])[0]
        self.send_commits()
        return reply

    def handle_batch(self, payloads: list) -> list[list | None]:
        """Frames of the reply to each edge request in `payloads` (requests of different devices), or None
        for one whose lease must wait; never raises for bad input. The decisions and verifications among
        them go through the cloud layers and the LM head together (batch.BatchFolder). Their commits wait
        for send_commits()."""
        replies: list[list | None] = [None] * len(payloads)
        pending: list[tuple[int, Pending]] = []
        for i, frames in enumerate(payloads):
            seq = 0
            try:
                msg = ep.parse(frames, self.requests.commands)
                seq = msg.seq
                got = self.requests(msg)  # a reply, or a Pending to compute with the batch
                if isinstance(got, Pending):
                    pending.append((i, got))
                else:
                    replies[i] = got.to_frames()
            except Exception as exc:  # noqa: BLE001 (_failure tells a bug from a refusal)
                replies[i] = self._failure(seq, exc)
        if pending:
            t0 = time.perf_counter()
            try:
                verdicts = self.folder.run([p.fold for _, p in pending])
            except Exception as exc:  # noqa: BLE001 (a bug: every request of the batch hears of it)
                for i, p in pending:
                    self._drop(p.msg.device_id)
                    replies[i] = self._failure(p.msg.seq, exc)
                return replies
            seconds = time.perf_counter() - t0  # the batch's compute: each of its requests waited for it
            for (i, p), verdict in zip(pending, verdicts):
                try:
                    replies[i] = self._finish(p, verdict, seconds).to_frames()
                except Exception as exc:  # noqa: BLE001
                    replies[i] = self._failure(p.msg.seq, exc)
        return replies

    def _failure(self, seq: int, exc: Exception) -> list | None:
        """The edge's error reply for `exc` (None: NOT_YET, the broker parks the request)."""
        if isinstance(exc, ProtocolError):
            log.warning("edge request refused: %s", exc)
            return ep.Error(seq, ErrorCode.MALFORMED, clip(str(exc))).to_frames()
        if isinstance(exc, Refused):
            return None if exc.code == ErrorCode.NOT_YET else ep.Error(seq, exc.code, clip(str(exc))).to_frames()
        log.error("request failed", exc_info=exc)  # a bug must not take the worker down; the edge hears of it
        return ep.Error(seq, ErrorCode.INTERNAL, clip(f"{type(exc).__name__}: {exc}")).to_frames()

    def _call(self, msg, retry_later: bool = False):
        """The content manager's answer to `msg`. A call it does not answer in time (the socket then starts
        afresh, so a late answer cannot pass for the next call's) fails the request; with `retry_later`
        (OPEN and LEASE: nothing computed yet) the broker keeps the request and sends it out again, so a
        restarted content manager serves it (a lease then hears that the session is gone)."""
        try:
            self.state.send(msg.to_frames())
            reply = sp.parse(self.state.receive(time.monotonic() + self.state_timeout), sp.REPLIES)
        except CallTimeout:
            raise Refused(ErrorCode.NOT_YET if retry_later else ErrorCode.INTERNAL,
                          "the content manager did not answer") from None
        if isinstance(reply, sp.Error):
            raise Refused(reply.code, reply.message)
        return reply

    def hello(self, msg: ep.Hello) -> ep.Welcome:
        dtype = str(self.runner.embed.weight.dtype).removeprefix("torch.")  # the compute dtype
        if msg.dtype != dtype:
            raise Refused(ErrorCode.MISMATCH, f"dtype mismatch: the edge computes in {msg.dtype}, the cloud in "
                          f"{dtype} (start the edge with --dtype {dtype})")
        if msg.identity != self.identity or msg.n_layers != self.split.n_layers:
            raise Refused(ErrorCode.MISMATCH, f"model mismatch: the edge runs {msg.identity[:12]} "
                          f"({msg.n_layers} layers), the cloud serves {self.identity[:12]} ({self.split.n_layers} layers)")
        if tuple(msg.exits) != self.split.exits or msg.upload_layer != self.split.upload_layer:
            edge = f"exits {','.join(map(str, msg.exits))}, upload after {msg.upload_layer}"
            raise Refused(ErrorCode.MISMATCH, f"split mismatch: the edge has {edge}, the cloud serves "
                          f"exits {','.join(map(str, self.split.exits))}, upload after {self.split.upload_layer}")
        opened = self._call(sp.Open(msg.device_id, DTYPE_CODES[msg.wire_dtype], msg.instance, msg.take_over),
                            retry_later=True)
        return ep.Welcome(msg.device_id, msg.seq, opened.session, opened.capacity, opened.rows_offset, opened.segment)

    def decide(self, msg: ep.Decide) -> Pending | ep.Token:
        return self._prepare(msg, verify=False)

    def verify(self, msg: ep.Verify) -> Pending | ep.Token:
        return self._prepare(msg, verify=True)

    def _prepare(self, msg: ep.Decide | ep.Verify, verify: bool) -> Pending | ep.Token:
        """The request's fold, ready for the batch: from the lease this worker keeps on the device when its
        segment's header says it is still this worker's and the rows are in, else from a new lease. A
        Token when the request was answered already (a retry)."""
        held = self.held.get(msg.device_id)
        if held is not None:
            fold = self._fold_held(held, msg, verify)
            if fold is not None:
                return Pending(msg, fold, held)
            self._drop(msg.device_id)
        epoch = msg.epoch if verify else 0
        grant = self._call(sp.Lease(msg.device_id, msg.session, msg.seq, msg.position, self.remote, verify, epoch),
                           retry_later=True)
        if isinstance(grant, sp.Decided):  # a retry: the first worker committed this, then died
            return ep.Token(grant.position, grant.token, grant.prob, msg.device_id, msg.seq, 0.0)
        if isinstance(grant, sp.StateGrant) != self.remote:
            raise Refused(ErrorCode.INTERNAL, f"the content manager answered a {'remote' if self.remote else 'local'} "
                          f"lease with {type(grant).__name__}")
        drafts = {grant.folded + i: d for i, d in enumerate(grant.drafts) if d != ep.NO_DRAFT} if verify else None
        if self.remote:
            return self._remote_fold(msg, grant, drafts)
        wire = DTYPES.get(grant.wire_code)
        assert wire is not None, f"the content manager granted an unknown wire code {grant.wire_code}"
        layout = shm.StateLayout(capacity=grant.capacity, wire_itemsize=wire.itemsize, **self.layout_base)
        views = SegmentViews(self._segment(grant.segment), layout, self.runner.embed.weight.dtype,
                             getattr(torch, wire.name), self.split.upload_layer)
        held = self.held[msg.device_id] = HeldLease(msg.session, grant.token, grant.folded, grant.segment, views)
        return Pending(msg, self._local_fold(held, msg.position, drafts), held)

    def _fold_held(self, held: HeldLease, msg, verify: bool) -> Fold | None:
        """The fold of `msg` on a kept lease, or None when the lease no longer fits (ask the content manager).
        NOT_YET (the broker parks the request) when its rows are not in yet."""
        if self.remote or msg.session != held.session or not held.folded <= msg.position < held.capacity:
            return None  # the content manager answers these (a retry's token, stale, beyond the capacity)
        if held.segment not in self.segments:
            return None  # unmapped meanwhile (sweep): lease again
        self.segments.move_to_end(held.segment)
        header = held.views.header
        # the header is the content manager's word (a same-host edge that maps the segment could change it, but
        # only for its own session: what it could make the worker read is bounded by the capacity)
        if int(header[shm.LEASE]) != held.token or verify and msg.epoch != int(header[shm.EPOCH]):
            return None  # another worker took the device over, the session ended, or the epoch is over
        if msg.position >= int(header[shm.RECEIVED]):
            raise Refused(ErrorCode.NOT_YET, f"position {msg.position} not received yet")
        drafts = None
        if verify:
            row_drafts = held.views.drafts[held.folded:msg.position + 1].tolist()
            drafts = {held.folded + i: d for i, d in enumerate(row_drafts) if d != ep.NO_DRAFT}
        return self._local_fold(held, msg.position, drafts)

    def _local_fold(self, held: HeldLease, position: int, drafts) -> Fold:
        """A fold over the device's segment: the KV is written in place."""
        views = held.views
        views.cache.lengths = [held.folded] * views.cache.n_layers
        rows = views.rows[held.folded:position + 1].unsqueeze(0)  # [n, hidden] -> [1, n, hidden]
        return Fold(views.cache, rows, held.folded, drafts)

    def _finish(self, p: Pending, verdict: Verdict, seconds: float) -> ep.Token:
        """End the request's work: commit (keeping the lease), or roll the session back at a wrong draft
        (a call: cut back before the edge hears of it); the edge's TOKEN."""
        msg, row = p.msg, verdict.row
        ending = (sp.Rollback if verdict.rolls_back(p.fold) else sp.Commit)(
            msg.device_id, p.token, row + 1, verdict.token, verdict.prob, msg.seq, keep=p.held is not None)
        if self.remote:
            self._commit_remote(msg, p, ending)
        elif isinstance(ending, sp.Rollback):
            try:
                self._call(ending)
            except Refused:
                self._drop(msg.device_id)
                raise
            p.held.folded = row + 1
        else:
            if not self.commits:
                self.commits_since = time.monotonic()
            self.commits.append(ending)  # sent when the worker is idle (send_commits)
            p.held.folded = row + 1
        return ep.Token(row, verdict.token, verdict.prob, msg.device_id, msg.seq, seconds)

    def commits_due(self, now: float) -> bool:
        """Whether the commits waiting should go now though requests keep coming."""
        return len(self.commits) >= MAX_WAITING_COMMITS or now - self.commits_since >= COMMIT_SECONDS

    def send_commits(self) -> None:
        """Send the commits (one way) that wait: after the replies, when the worker is idle, so a token never
        waits for the content manager to wake and take the CPU. The worker keeps the lease meanwhile; one
        that dies before they leave has answered, and the next worker is granted the state as last
        committed: it folds those rows again (they stay in the segment until committed) to the same KV."""
        commits, self.commits = self.commits, []
        for commit in commits:
            try:
                self.state.send(commit.to_frames())
            except CallTimeout:  # the content manager is not taking messages; the next lease hands the state on
                log.warning("device %d: the content manager took no commit", commit.device_id)

    def _drop(self, device_id: int) -> None:
        """Forget the lease kept on the device (the content manager has taken it back, or it is in doubt)."""
        self.held.pop(device_id, None)

    def _commit_remote(self, msg, p: Pending, ending: sp.LeaseEnd) -> None:
        """A remote worker commits the KV entries it appended, [grant's folded, row + 1), a call."""
        start = p.fold.folded
        kv = p.storage[:, :, :, start:ending.folded].contiguous()  # [L, 2, kv, kept, hd]
        layers, _, n_kv, kept, hd = kv.shape
        entries = to_numpy(kv.view(layers * 2, n_kv, kept, hd))  # [L*2, kv, kept, hd]
        rollback = isinstance(ending, sp.Rollback)
        commit = sp.StateCommit(msg.device_id, p.token, start, ending.folded, ending.decided, ending.prob, entries,
                                rollback)
        try:
            self._call(commit)  # COMMITTED, or an error: the state is then as before
        except Refused as exc:
            if rollback:  # the session was not cut back: the edge must not go on from the wrong draft
                raise
            log.warning("device %d: remote commit refused: %s (the answer is right all the same)", msg.device_id, exc)

    def _remote_fold(self, msg, grant: sp.StateGrant, drafts) -> Pending:
        """A fold of the granted rows up to the request's position on a copy of the granted KV."""
        dtype = self.runner.embed.weight.dtype
        base = self.layout_base
        layers, n_kv, hd = base["cloud_layers"], base["n_kv_heads"], base["head_dim"]
        position = msg.position
        folded, n = grant.folded, position + 1 - grant.folded
        assert 0 < n <= grant.rows.shape[0], f"granted rows [{folded}, {grant.received}) miss position {position}"
        if (grant.kv.dtype.name, grant.kv.shape) != (str(dtype).removeprefix("torch."), (layers * 2, n_kv, folded, hd)) \
                or grant.rows.shape[1] != base["hidden"]:
            raise Refused(ErrorCode.INTERNAL, f"granted KV {grant.kv.dtype.name} {grant.kv.shape} / rows "
                          f"{grant.rows.shape} do not fit this model")
        storage = torch.empty(layers, 2, n_kv, position + 1, hd, dtype=dtype)  # [L, 2, kv, position+1, hd]
        to_numpy(storage)[:, :, :, :folded] = grant.kv.reshape(layers, 2, n_kv, folded, hd)  # [L, 2, kv, folded, hd]
        rows = from_numpy(grant.rows[:n].copy())  # [n, hidden]; the frame itself is read-only
        cache = KVCache(self.split.upload_layer, layers, n_kv, hd, storage=storage)
        cache.lengths = [folded] * layers
        fold = Fold(cache, rows.view(1, n, base["hidden"]), folded, drafts)  # rows [1, n, hidden]
        return Pending(msg, fold, None, grant.token, storage)


class SegmentViews:
    """Arrays and tensors over one device's mapped segment, made once a lease (not once a token)."""

    def __init__(self, seg: shm.Attachment, layout: shm.StateLayout, kv_dtype: torch.dtype, wire_dtype: torch.dtype,
                 first_layer: int) -> None:
        self.header = shm.header(seg.buf)  # the content manager's words: shm.LEASE, RECEIVED, EPOCH
        self.drafts = shm.drafts(seg.buf, layout)  # [capacity] the edge's token after each row
        count = 1
        for n in layout.kv_shape:
            count *= n
        kv = torch.frombuffer(seg.buf, dtype=kv_dtype, count=count, offset=layout.kv_offset).view(layout.kv_shape)
        self.cache = KVCache(first_layer, layout.cloud_layers, layout.n_kv_heads, layout.head_dim, storage=kv)
        rows = torch.frombuffer(seg.buf, dtype=wire_dtype, count=layout.capacity * layout.hidden,
                                offset=layout.rows_offset)
        self.rows = rows.view(layout.capacity, layout.hidden)  # [capacity, hidden], the wire dtype


@dataclass
class HeldLease:
    """A lease this worker keeps on a device between its requests (a local worker: the state is in the
    device's segment, whose header says whether the lease is still this worker's)."""

    session: int
    token: int
    folded: int  # positions in the KV cache, as this worker left them
    segment: str
    views: SegmentViews

    @property
    def capacity(self) -> int:
        return self.views.rows.shape[0]


@dataclass
class Pending:
    """A request of the batch being computed: its message, its fold, and what its commit names."""

    msg: ep.Decide | ep.Verify
    fold: Fold
    held: HeldLease | None  # the kept lease it is served on (None: a remote worker's grant)
    remote_token: int = 0  # a remote grant's lease
    storage: torch.Tensor | None = None  # a remote fold's KV [L, 2, kv, position+1, hd], committed after

    @property
    def token(self) -> int:
        return self.held.token if self.held is not None else self.remote_token
