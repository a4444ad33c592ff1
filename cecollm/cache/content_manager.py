"""The content manager: the one process that owns every device's state.

Per device session it keeps a shared-memory segment (cloud KV cache and the received
upload-layer rows, see shm.py) and a record of what it holds. Edges push rows straight to
its upload PULL socket; workers ask on its state ROUTER socket for a lease on a device, then
compute in the segment and commit (one way) how many positions are now folded into the KV cache (a remote
worker, on another host, gets the state as tensors and commits the KV entries it appended, which are
checked and written into the segment here: remote_state.py). A verifying lease of the exact mode that finds a wrong
draft ends with a roll-back instead (device.py). A lease never waits: one that cannot be granted yet
is answered NOT_YET, and the broker, which parks the request, asks (WATCH) to hear when it may go.
A worker on this host keeps its lease between a device's requests (COMMIT keep): the segment's header,
written here only, names the current lease and says what has arrived, so that worker serves the next
request without a call; any other worker's LEASE takes a kept lease over. Rows that are folded are
dropped (their pages given back). A session ends when the edge says so,
after an idle TTL, or when a byte budget needs room (least recently used idle device first). Sessions
are 64 random bits; a device id that another edge (instance) is generating with is refused IN_USE.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import zmq

from cecollm.cache import remote_state, shm
from cecollm.cache.device import DeviceState, StaleUpload, Watcher
from cecollm.cache.stats import ManagerCounts
from cecollm.errors import UserError
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.dispatch import Dispatcher, drain
from cecollm.wire.security import DEVICES, WORKERS, KeyRing
from cecollm.wire.wire import DTYPES, MAX_BODY, ErrorCode, ProtocolError, clip

log = logging.getLogger(__name__)

KV_ITEMSIZES = {"float32": 4, "float16": 2, "bfloat16": 2}  # bytes per KV element by the model's dtype
CHORES_SECONDS = 0.02  # housekeeping (lapsed leases, idle TTL) at most this often
MAX_WATCHERS = 16  # parked requests one device may have watched (the oldest is dropped: the broker times it out)


@dataclass(frozen=True)
class ContentManagerConfig:
    """How the content manager runs (built by the broker)."""

    upload_address: str  # PULL socket edges push rows and END to (bound here)
    state_address: str  # ROUTER socket workers lease device state on (bound here)
    cloud_layers: int  # decoder layers the cloud runs (KV cache depth)
    n_kv_heads: int  # the model's key/value heads
    head_dim: int  # the model's head size
    hidden: int  # the model's hidden size (row width)
    kv_dtype: str = "float32"  # the model's dtype (torch name): KV elements in the segment
    capacity: int = 1024  # positions per device session (prompt + generated tokens)
    budget_bytes: int = 1 << 30  # all sessions' segments together stay under this
    idle_ttl: float = 600.0  # seconds without any message before a session is released
    claim_seconds: float = 30.0  # a session used within this long belongs to its edge: another edge is refused
    watch_seconds: float = 2.0  # a parked request's watch lapses after this (the broker's --wait-seconds: by then
    #                             it has answered the request), so a device is not held busy by a request long gone
    lease_seconds: float = 120.0  # a lease not committed within this lapses
    segment_prefix: str = "cecollm-0-"  # segment names start with this (shm.segment_prefix)
    keys: str = ""  # the keys directory: uploads speak CURVE with device keys (a tcp state socket: worker keys)
    local_workers: tuple[bytes, ...] = ()  # public keys of the broker's own workers (made at its start)

    def layout(self, wire_itemsize: int) -> shm.StateLayout:
        """The byte layout of one device's segment, for rows of `wire_itemsize` bytes a value."""
        return shm.StateLayout(self.cloud_layers, self.n_kv_heads, self.head_dim, self.hidden, self.capacity,
                               KV_ITEMSIZES[self.kv_dtype], wire_itemsize)


class BudgetExceeded(Exception):
    """No room for a new session even after evicting every idle one."""


class ContentManager:
    """The serving loop and the device records."""

    def __init__(self, config: ContentManagerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.devices: OrderedDict[int, DeviceState] = OrderedDict()  # least recently used first
        self.ended: OrderedDict[int, str] = OrderedDict()  # device -> why its last session went away
        self.used_bytes = 0
        self._counter = random.randrange(1 << 30)
        self.running = True
        self.failures = 0  # messages a handler failed on (bugs, logged)
        self.counts = ManagerCounts()  # what the broker's metrics show of this process (SNAPSHOT)
        self.ring: KeyRing | None = None  # the accepted keys (None: --insecure)
        self.auth = None  # the ZAP authenticator thread while the sockets are bound
        self.upload: zmq.Socket | None = None  # PULL: edges' rows and ENDs
        self.state: zmq.Socket | None = None  # ROUTER: workers' requests
        self.uploads = Dispatcher({ep.Upload: self.on_rows, ep.UploadShm: self.on_rows_in_segment, ep.End: self.on_end})
        self.controls = Dispatcher({sp.Open: self.on_open, sp.Lease: self.lease, sp.Commit: self.on_commit,
                                    sp.StateCommit: self.on_state_commit, sp.Rollback: self.on_rollback,
                                    sp.Watch: self.on_watch, sp.Stats: self.on_stats})

    # ---- the loop ----------------------------------------------------------------------
    def bind(self) -> None:
        """Bind the upload and state sockets (a UserError when an address is taken)."""
        self.upload = self.context.socket(zmq.PULL)
        self.state = self.context.socket(zmq.ROUTER)
        largest = self.config.layout(wire_itemsize=4)  # a peer's frame beyond what one device can hold is cut off
        self.upload.setsockopt(zmq.MAXMSGSIZE, max(MAX_BODY, largest.capacity * largest.row_bytes))
        self.state.setsockopt(zmq.MAXMSGSIZE, max(MAX_BODY, largest.kv_bytes))  # a remote worker's whole KV
        for sock in (self.upload, self.state):
            sock.setsockopt(zmq.LINGER, 0)
        if self.config.keys:
            self.ring = KeyRing(self.config.keys)
            for public in self.config.local_workers:
                self.ring.add_worker(public, "local")
            self.auth = self.ring.authenticator(self.context)
            self.ring.secure(self.upload, DEVICES)
            if self.config.state_address.startswith("tcp://"):
                self.ring.secure(self.state, WORKERS)
        try:
            for endpoint in self.config.upload_address.split(","):
                self.upload.bind(endpoint)
            self.state.bind(self.config.state_address)
        except zmq.ZMQError as exc:  # most likely an address already in use
            self.close()
            raise UserError(f"content manager: {exc} (uploads {self.config.upload_address}, "
                            f"state {self.config.state_address})") from None

    def serve(self, runtime=None) -> None:
        """Poll, dispatch, housekeeping, until `running` is False (or the runtime is told to stop)."""
        if self.upload is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self.upload, zmq.POLLIN)
        poller.register(self.state, zmq.POLLIN)
        next_chores = time.monotonic()
        try:
            while self.running and (runtime is None or runtime.running):
                ready = dict(poller.poll(50))
                if self.upload in ready:
                    self.failures += drain(self.upload, self.on_upload, log)
                if self.state in ready:
                    self.failures += drain(self.state, self.on_control, log)
                now = time.monotonic()
                if now >= next_chores:  # not on every message: a busy loop would pay it per row
                    self.housekeeping(now)
                    if runtime is not None:
                        runtime.run_reloads()
                    next_chores = now + CHORES_SECONDS
        finally:
            self.release_all()
            self.close()

    def close(self) -> None:
        for sock in (self.upload, self.state):
            if sock is not None:
                sock.close()
        self.upload = self.state = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def housekeeping(self, now: float) -> None:
        for dev in list(self.devices.values()):
            if dev.watchers:
                dev.watchers = [w for w in dev.watchers if now - w.since < self.config.watch_seconds]
                self._wake(dev, now)  # a lease that lapsed lets a parked request go
            if not dev.leased(now) and not dev.watchers and now - dev.last_used > self.config.idle_ttl:
                self.counts.idle_releases += 1
                self.release(dev, f"idle for more than {self.config.idle_ttl:g} s")

    # ---- uploads (no replies) ----------------------------------------------------------
    def on_upload(self, frames) -> None:
        msg = None
        try:
            msg = ep.parse(frames, self.uploads.commands)
            if self.ring is not None and not self.ring.may_act_for(frames[-1].get("User-Id"), msg.device_id):
                raise ProtocolError(f"a key acted for device {msg.device_id}, which it may not")
            dev = self.devices.get(msg.device_id)
            if dev is None or dev.session != msg.session:
                raise ProtocolError(f"device {msg.device_id} session {msg.session} is not open")
            dev.last_used = time.monotonic()
            self.devices.move_to_end(dev.device_id)
            self.uploads(msg, dev)
        except ProtocolError as exc:
            self.counts.uploads_refused += 1
            if msg is None:  # it did not parse
                self.counts.refused_upload_frames += 1
            log.warning("upload refused: %s", exc)

    def on_end(self, msg: ep.End, dev: DeviceState) -> None:
        self.counts.uploads_taken += 1
        self.release(dev, "the generation ended")

    def on_rows(self, msg: ep.Upload, dev: DeviceState) -> None:
        if self._take_rows(msg, dev, msg.rows.shape[0]):
            self.counts.upload_network_bytes += msg.rows.nbytes

    def on_rows_in_segment(self, msg: ep.UploadShm, dev: DeviceState) -> None:
        if self._take_rows(msg, dev, msg.count):
            self.counts.upload_shm_bytes += msg.count * dev.layout.row_bytes

    def _take_rows(self, msg, dev: DeviceState, count: int) -> bool:
        """Whether the rows were taken (not stale); rows that do not fit raise ProtocolError."""
        try:
            dev.take_rows(msg, count)
        except StaleUpload as exc:  # the edge sent them before it heard of the roll-back
            self.counts.uploads_stale += 1
            log.debug("%s; dropped", exc)
            return False
        self.counts.uploads_taken += 1
        self._wake(dev, time.monotonic())
        return True

    # ---- worker requests ---------------------------------------------------------------
    def on_control(self, frames) -> None:
        if len(frames) < 2 or frames[1].bytes != b"":
            self.counts.refused_state_frames += 1
            log.warning("state request without a proper envelope (%d frames)", len(frames))
            if frames:
                self._reply(frames[0].bytes, sp.Error(ErrorCode.MALFORMED, "expected [empty delimiter, message]"))
            return
        peer = frames[0].bytes
        try:
            msg = sp.parse(frames[2:], self.controls.commands)
        except ProtocolError as exc:
            self.counts.refused_state_frames += 1
            log.warning("state request refused: %s", exc)
            self._reply(peer, sp.Error(ErrorCode.MALFORMED, clip(str(exc))))
            return
        self.controls(msg, peer)

    def on_stats(self, msg: sp.Stats, peer: bytes) -> None:
        """The broker's metrics: what this process holds and its counts (a SNAPSHOT)."""
        self._reply(peer, self.counts.snapshot(len(self.devices), self.used_bytes))

    def on_open(self, msg: sp.Open, peer: bytes) -> None:
        self._reply(peer, self.open(msg))

    def on_state_commit(self, msg: sp.StateCommit, peer: bytes) -> None:
        """A remote worker's commit is a call: answered."""
        refused = self.commit_state(msg)
        if refused:
            log.warning("remote commit refused: %s", refused[1])
        self._reply(peer, sp.Error(*refused) if refused else sp.Committed(msg.folded))

    def on_rollback(self, msg: sp.Rollback, peer: bytes) -> None:
        """A verifying lease ends at a wrong draft: a call, answered once the session is cut back."""
        refused = self.commit(msg)
        if refused:
            log.warning("roll-back refused: %s", refused)
        self._reply(peer, sp.Error(ErrorCode.STALE, refused) if refused else sp.Committed(msg.folded))

    def on_commit(self, msg: sp.Commit, peer: bytes) -> None:
        """A shared-memory worker's commit is one way: no reply. It leaves the worker after the edge's token, so
        the session may have ended meanwhile (the edge's END came first): that is no news."""
        refused = self.commit(msg)
        if refused:
            log.log(logging.WARNING if msg.device_id in self.devices else logging.DEBUG, "commit refused: %s", refused)

    def _reply(self, peer: bytes, msg) -> None:
        self.state.send_multipart([peer, b"", *msg.to_frames()], copy=False)

    def open(self, msg: sp.Open):
        if msg.wire_code not in DTYPES:
            return sp.Error(ErrorCode.MALFORMED, f"unknown wire dtype code {msg.wire_code}")
        old = self.devices.get(msg.device_id)
        if old is not None:
            busy = self._claimed(old, msg)
            if busy:
                return sp.Error(ErrorCode.IN_USE, busy)
            self.release(old, "a new generation started" if old.owner == msg.instance else "another edge took over")
        c = self.config
        layout = c.layout(DTYPES[msg.wire_code].itemsize)
        try:
            self._make_room(layout.nbytes)
        except BudgetExceeded as exc:
            return sp.Error(ErrorCode.BUDGET, str(exc))
        self._counter = (self._counter + 1) % (1 << 32) or 1
        name = f"{c.segment_prefix}{msg.device_id}-{self._counter}"  # the edge learns it only with its session
        try:
            segment = shm.create(name, layout.nbytes)
        except OSError as exc:  # /dev/shm full, too many open files...: refuse this one, keep serving
            log.warning("device %d: no shared-memory segment of %d bytes: %s", msg.device_id, layout.nbytes, exc)
            return sp.Error(ErrorCode.BUDGET, f"no shared memory for the device's state: {exc}")
        dev = DeviceState(msg.device_id, secrets.randbits(64) or 1, msg.wire_code, layout, segment, owner=msg.instance)
        self.devices[msg.device_id] = dev
        self.used_bytes += layout.nbytes
        self.ended.pop(msg.device_id, None)
        log.debug("device %d: session %d opened (%d bytes)", msg.device_id, dev.session, layout.nbytes)
        return sp.Opened(dev.session, layout.capacity, layout.rows_offset, name)

    def _claimed(self, dev: DeviceState, msg: sp.Open) -> str | None:
        """Why `dev`'s session still belongs to another edge (instance), or None when `msg` may replace it."""
        if msg.take_over or dev.owner == msg.instance:
            return None
        age = time.monotonic() - dev.last_used
        if not dev.leased(time.monotonic()) and age >= self.config.claim_seconds:
            return None  # that edge is gone (no upload, no request for claim_seconds)
        return (f"device {msg.device_id} is in use by another edge (active {age:.1f} s ago): stop that edge, wait "
                f"{self.config.claim_seconds:g} s after it, or take over its device id (cecollm-edge --take-over)")

    def _make_room(self, nbytes: int) -> None:
        now = time.monotonic()
        while self.used_bytes + nbytes > self.config.budget_bytes:
            idle = next((d for d in self.devices.values() if not d.leased(now) and not d.watchers), None)
            if idle is None:  # says nothing of other devices: only that this one does not fit now
                raise BudgetExceeded("the cloud has no room for another device's state now (its byte budget is "
                                     "held by devices in use); try again later")
            self.counts.evictions += 1
            self.release(idle, "evicted to make room (byte budget)")

    def lease(self, msg: sp.Lease, peer: bytes) -> None:
        """Grant at once, or refuse: NOT_YET when the rows are not in or another worker holds the device."""
        dev = self.devices.get(msg.device_id)
        if dev is None or dev.session != msg.session:
            why = self.ended.get(msg.device_id, "never opened") if dev is None else "it ended"
            self._reply(peer, sp.Error(ErrorCode.UNKNOWN_DEVICE, f"device {msg.device_id} session {msg.session} "
                                       f"has no state on the cloud ({why})"))
            return
        now = time.monotonic()
        dev.last_used = now
        self.devices.move_to_end(dev.device_id)
        refusal = dev.refusal(msg, now, self.config.kv_dtype)
        if isinstance(refusal, sp.Decided):
            self._reply(peer, refusal)  # its first worker committed (or rolled back), then died before replying
        elif refusal is not None:
            self._reply(peer, sp.Error(*refusal))
        else:
            self._grant(dev, msg, peer, now)

    def _grant(self, dev: DeviceState, lease: sp.Lease, peer: bytes, now: float) -> None:
        self._counter = (self._counter + 1) % (1 << 32) or 1
        dev.grant(self._counter, lease.seq, now + self.config.lease_seconds)
        drafts = dev.pending_drafts() if lease.verify else ()
        if lease.remote:
            self._reply(peer, remote_state.state_grant(dev, self.config.kv_dtype, drafts))
        else:
            self._reply(peer, sp.Grant(dev.lease_token, dev.folded, dev.received, dev.layout.capacity, dev.wire_code,
                                       dev.segment.name, drafts))

    # ---- parked requests (the broker's watches) ----------------------------------------
    def on_watch(self, msg: sp.Watch, peer: bytes) -> None:
        dev = self.devices.get(msg.device_id)
        now = time.monotonic()
        if dev is None or dev.session != msg.session or dev.may_go(msg.seq, msg.position, now):
            self._reply(peer, sp.Arrived(msg.job))
            return
        dev.watchers.append(Watcher(peer, msg.job, msg.seq, msg.position, now))
        del dev.watchers[:-MAX_WATCHERS]

    def _wake(self, dev: DeviceState, now: float) -> None:
        """ARRIVED for every parked request of `dev` that may go to a worker now."""
        keep = []
        for w in dev.watchers:
            if dev.may_go(w.seq, w.position, now):
                self._reply(w.peer, sp.Arrived(w.job))
            else:
                keep.append(w)
        dev.watchers = keep

    def commit_state(self, msg: sp.StateCommit) -> tuple[ErrorCode, str] | None:
        """A remote worker's commit: check its KV entries against the device, write them, end the lease."""
        dev = self.devices.get(msg.device_id)
        if dev is None or msg.token == 0 or dev.lease_token != msg.token:
            return ErrorCode.STALE, f"device {msg.device_id}: lease {msg.token} is not current"
        refused = remote_state.write_commit(dev, self.config.kv_dtype, msg)
        if refused:
            return refused
        ending = sp.Rollback if msg.rollback else sp.Commit
        refused = self.commit(ending(msg.device_id, msg.token, msg.folded, msg.decided, msg.prob))
        assert refused is None, f"a checked remote commit was refused: {refused}"
        return None

    def commit(self, msg: sp.Commit | sp.Rollback) -> str | None:
        """End a lease with `folded` positions in the KV (a ROLLBACK: and cut the session back there);
        why it was refused, or None."""
        dev = self.devices.get(msg.device_id)
        if dev is None or msg.token == 0 or dev.lease_token != msg.token:
            return f"device {msg.device_id}: lease {msg.token} is not current"
        if not dev.folded <= msg.folded <= dev.received:
            return f"device {msg.device_id}: folded {msg.folded} outside [{dev.folded}, {dev.received}]"
        if isinstance(msg, sp.Rollback):
            dev.roll_back(msg)
            log.debug("device %d: rolled back to %d positions (epoch %d)", dev.device_id, dev.folded, dev.epoch)
        else:
            dev.end_lease(msg)
        self._wake(dev, time.monotonic())
        return None

    # ---- releasing ---------------------------------------------------------------------
    def release(self, dev: DeviceState, why: str) -> None:
        for w in dev.watchers:  # their requests learn from their lease that the state is gone
            self._reply(w.peer, sp.Arrived(w.job))
        del self.devices[dev.device_id]
        self.used_bytes -= dev.layout.nbytes
        dev.close()
        dev.segment.close()
        shm.unlink(dev.segment)
        self.ended[dev.device_id] = why
        while len(self.ended) > 4096:
            self.ended.popitem(last=False)
        log.debug("device %d: session %d released (%s)", dev.device_id, dev.session, why)

    def release_all(self) -> None:
        for dev in list(self.devices.values()):
            dev.watchers = []
            self.release(dev, "the broker shut down")


def serve_content_manager(config: ContentManagerConfig, runtime) -> int:
    """The content manager's main (started by the broker through the process runtime)."""
    manager = ContentManager(config)
    manager.bind()
    if manager.ring is not None:
        runtime.on_reload(manager.ring.reload)
    runtime.ready(upload=config.upload_address, state=config.state_address)
    manager.serve(runtime)
    return 0
