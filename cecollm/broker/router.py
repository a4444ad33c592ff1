"""The broker's routing loop: edge requests in, batches to free workers out.

Edges talk to the request ROUTER (REQ-style envelopes); workers to the worker ROUTER
(broker_worker protocol). A worker that is free gets what is waiting, up to `max_batch` requests of
different devices, at once (no timer: a lone request goes alone). A device's requests go to the
worker that served it last (it keeps the device's lease, so a token costs no call to the content
manager); a device new to the pool goes to a worker that serves no more devices than any other, and
a device at rest for AFFINITY_SECONDS is free to go anywhere. A device has one request at a worker
at a time. Requests are checked before they are queued (a bad one is answered
with an error at once), and a device has at most `max_per_device` requests in the broker. A
worker that misses `liveness` heartbeats, or holds a job longer than `job_seconds`, is purged
and its request goes to another worker (up to `retries` times), because the device's state lives
in the content manager, not in the worker. A request whose rows are still in flight comes back
from its worker (DEFER) and is parked, holding no worker, until the content manager says it may
go (WATCH, ARRIVED on the `state` socket) or `wait_seconds` pass (then the edge hears MISSING).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import zmq

from cecollm.broker.metrics import COMMANDS, OTHER, BrokerMetrics, command_of, error_label
from cecollm.broker.pool import Job, WorkerPool, WorkerRecord
from cecollm.wire import broker_worker as wp
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.dispatch import Dispatcher, drain
from cecollm.wire.wire import ErrorCode, Frames, ProtocolError, clip

log = logging.getLogger(__name__)

CHORES_SECONDS = 0.02  # purging silent workers and the on_tick chores run at most this often
REOPEN_SECONDS = 5.0  # a HELLO whose OPEN went unanswered (a content manager restarting) is tried again this long
REOPEN_EVERY = 0.1  # ...this often
AFFINITY_SECONDS = 30.0  # a device without requests this long no longer counts for its worker


class Broker:
    """Routes edge requests to workers; knows nothing about models or state."""

    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket, worker_config: wp.Config,
                 max_queue: int = 1024, retries: int = 1, authorize=None, state: zmq.Socket | None = None,
                 wait_seconds: float = 2.0, job_seconds: float = 60.0, max_per_device: int = 4,
                 local_key: bytes | None = None, metrics: BrokerMetrics | None = None, max_batch: int = 1) -> None:
        """`authorize(user_id, device_id)`: whether the key CURVE authenticated may act for the device the
        request names (security.KeyRing.may_act_for); None: no keys (--insecure). `state`: a DEALER to the
        content manager for parked requests (None: a deferred request waits out --wait-seconds, then MISSING).
        `local_key`: the key of the workers this broker started (only those may be killed when they hang);
        None: every worker is on this host (--insecure binds loopback only). `metrics`: where it counts what it
        does (default: a registry of its own that nobody reads). `max_batch`: most requests a worker gets at once."""
        self.frontend = frontend
        self.backend = backend
        self.state = state
        self.worker_config = worker_config
        self.max_queue = max_queue
        self.retries = retries
        self.authorize = authorize
        self.wait_seconds = wait_seconds
        self.job_seconds = job_seconds
        self.max_per_device = max_per_device
        self.local_key = local_key.decode() if local_key else None
        self.interval = worker_config.heartbeat_ms / 1000
        self.pool = WorkerPool(self.interval, worker_config.liveness)
        self.queue: deque[Job] = deque()
        self.parked: dict[int, Job] = {}  # job number -> a request waiting for its rows (no worker holds it)
        self.in_broker: Counter[int] = Counter()  # device id -> its requests queued, parked or at a worker
        self.max_batch = max_batch
        self.affinity: OrderedDict[int, Affinity] = OrderedDict()  # device id -> its worker, least recently used first
        self.at_worker: set[int] = set()  # devices with a request at a worker
        self.hung: list[int] = []  # pids of workers dropped for holding a job too long (the daemon kills its own)
        self._jobs = 0
        self.running = True
        self.bad_messages = 0
        self.failures = 0  # messages a handler failed on (bugs, logged)
        self.from_worker = Dispatcher({wp.Connect: self.on_connect, wp.Ready: self.on_ready,
                                       wp.Heartbeat: self.on_heartbeat, wp.Reply: self.on_reply,
                                       wp.Defer: self.on_defer})
        self.metrics = metrics if metrics is not None else BrokerMetrics()
        self.metrics.track(self)

    @property
    def ready_workers(self) -> int:
        return self.pool.ready_count

    def serve(self, on_tick=None) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        if self.state is not None:
            poller.register(self.state, zmq.POLLIN)
        next_beat = next_chores = time.monotonic()
        while self.running:
            ready = dict(poller.poll(max(1, int(self.interval * 1000))))
            if self.backend in ready:
                self.failures += drain(self.backend, self.on_worker, log)
            if self.state in ready:
                self.failures += drain(self.state, self.on_state, log)
            if self.frontend in ready:
                self.failures += drain(self.frontend, self.on_edge, log)
            self.dispatch()
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat()
                next_beat = now + self.interval
            if now >= next_chores:  # not on every message: a request passes this loop twice
                self.purge(now)
                self.forget_resting(now)
                self.expire_parked(now)
                if on_tick:
                    on_tick(self)
                next_chores = now + CHORES_SECONDS

    # ---- edges ---------------------------------------------------------------------------
    def on_edge(self, frames) -> None:
        client = frames[0].bytes
        if len(frames) < 2 or len(frames[1].buffer) != 0:
            self._refuse(client, 0, "expected [empty delimiter, message] (send like REQ)", OTHER)
            return
        try:
            msg = ep.parse(frames[2:], ep.REQUESTS)
        except ProtocolError as exc:
            self._refuse(client, 0, str(exc), command_of(frames[2:]))
            return
        command = COMMANDS[type(msg)]
        if self.authorize is not None and not self.authorize(frames[-1].get("User-Id"), msg.device_id):
            self.bad_messages += 1
            log.warning("edge request refused: a key acted for device %d, which it may not", msg.device_id)
            self.metrics.count(command, error_label(ErrorCode.FORBIDDEN))
            self.reply(client, ep.Error(msg.seq, ErrorCode.FORBIDDEN, f"this key may not act for device "
                                        f"{msg.device_id}").to_frames())
            return
        if self.in_broker[msg.device_id] >= self.max_per_device:
            self.metrics.count(command, error_label(ErrorCode.BUSY))
            self.reply(client, ep.Error(msg.seq, ErrorCode.BUSY, f"device {msg.device_id} has "
                                        f"{self.max_per_device} requests in the cloud already").to_frames())
            return
        if len(self.queue) >= self.max_queue:
            self.metrics.count(command, error_label(ErrorCode.BUSY))
            self.reply(client, ep.Error(msg.seq, ErrorCode.BUSY, "the broker's queue is full").to_frames())
            return
        self._jobs += 1
        self.in_broker[msg.device_id] += 1
        self.queue.append(Job(self._jobs, client, msg.seq, tuple(frames[2:]), msg, arrived=time.monotonic()))

    def _refuse(self, client: bytes, seq: int, why: str, command: str) -> None:
        self.bad_messages += 1
        self.metrics.count(command, error_label(ErrorCode.MALFORMED))
        self.metrics.refused_frame("requests")
        log.warning("edge request refused: %s", why)
        self.reply(client, ep.Error(seq, ErrorCode.MALFORMED, clip(why)).to_frames())

    def reply(self, client: bytes, frames) -> None:
        self.frontend.send_multipart([client, b"", *frames], copy=False)

    def answer(self, job: Job, frames) -> None:
        """The edge's reply to `job`; the job leaves the broker."""
        self.reply(job.client, frames)
        self.metrics.answered(job.request, job.arrived, frames)
        device = job.request.device_id
        self.in_broker[device] -= 1
        if self.in_broker[device] <= 0:
            del self.in_broker[device]

    # ---- workers -------------------------------------------------------------------------
    def on_worker(self, frames) -> None:
        identity = frames[0].bytes
        try:
            msg = wp.parse(frames[1:], self.from_worker.commands)
        except ProtocolError as exc:
            self.metrics.refused_frame("workers")
            self._refuse_worker(identity, str(exc))
            return
        record = self.pool.get(identity)
        if record is None and not isinstance(msg, wp.Connect):
            log.warning("message from an unknown worker; told to go away")
            self.backend.send_multipart([identity, *wp.Disconnect().to_frames()])
            return
        self.from_worker(msg, identity, record, time.monotonic())
        if isinstance(msg, wp.Connect):  # its key says whether it is one of this broker's own workers
            self.pool.get(identity).local = self.local_key is None or frames[-1].get("User-Id") == self.local_key

    def _refuse_worker(self, identity: bytes, why: str) -> None:
        self.bad_messages += 1
        log.warning("worker message refused: %s", why)
        self.backend.send_multipart([identity, *wp.Error(clip(why)).to_frames()])

    def on_connect(self, msg: wp.Connect, identity: bytes, record: WorkerRecord | None, now: float) -> None:
        if record is not None:  # the same peer starts over: what it held goes to another worker
            self._forget(record)
        self.pool.connect(identity, msg.pid, now)
        self.backend.send_multipart([identity, *self.worker_config.to_frames()])

    def on_ready(self, msg: wp.Ready, identity: bytes, record: WorkerRecord, now: float) -> None:
        self.pool.heard(record, now)
        if not record.ready:
            record.ready, record.free_since = True, now
            log.info("worker %d ready (%d ready)", record.pid, self.ready_workers)

    def on_heartbeat(self, msg: wp.Heartbeat, identity: bytes, record: WorkerRecord, now: float) -> None:
        self.pool.heard(record, now)

    def on_reply(self, msg: wp.Reply, identity: bytes, record: WorkerRecord, now: float) -> None:
        job = self._finished(msg, identity, record, now)
        if job is not None:
            self.answer(job, msg.payload)

    def _finished(self, msg: wp.Reply | wp.Defer, identity: bytes, record: WorkerRecord, now: float) -> Job | None:
        """The job a worker is done with (with its batch's last, the worker is free again), or None when it
        names one it does not hold."""
        self.pool.heard(record, now)
        job = record.jobs.get(msg.job)
        if job is None:
            self._refuse_worker(identity, f"worker {record.pid} answered job {msg.job} it does not hold")
            return None
        self.pool.done(record, job, now)
        self.at_worker.discard(job.request.device_id)
        return job

    # ---- parked requests -----------------------------------------------------------------
    def on_defer(self, msg: wp.Defer, identity: bytes, record: WorkerRecord, now: float) -> None:
        """The job's lease must wait: the worker is free, the job parked until the content manager says so."""
        job = self._finished(msg, identity, record, now)
        if job is None:
            return
        job.attempts -= 1  # a deferral is no failed attempt
        request = job.request
        if not job.park_until:
            job.park_until = now + (REOPEN_SECONDS if isinstance(request, ep.Hello) else self.wait_seconds)
        self.parked[job.number] = job
        if isinstance(request, ep.Hello):  # the content manager did not answer its OPEN
            job.retry_at = now + REOPEN_EVERY
            return
        if self.state is None:
            return  # nothing to watch with: it waits out its time
        watch = sp.Watch(job.number, request.device_id, request.session, request.seq, request.position)
        try:
            self.state.send_multipart([b"", *watch.to_frames()], flags=zmq.NOBLOCK)
        except zmq.Again:  # the content manager is not taking messages: the job waits out its time
            log.warning("job %d: the content manager takes no watch; it waits out its time", job.number)

    def on_state(self, frames) -> None:
        try:
            msg = sp.parse(frames[1:], (sp.Command.ARRIVED, sp.Command.SNAPSHOT))
        except ProtocolError as exc:
            self.metrics.refused_frame("manager")
            log.warning("content manager message refused: %s", exc)
            return
        if isinstance(msg, sp.Snapshot):
            self.metrics.on_snapshot(msg)
            return
        job = self.parked.pop(msg.job, None)
        if job is not None:  # else it timed out meanwhile
            self.queue.appendleft(job)

    def expire_parked(self, now: float) -> None:
        """Parked jobs past their time are answered MISSING; HELLOs due another try go out again."""
        for job in list(self.parked.values()):
            if now >= job.park_until:
                del self.parked[job.number]
                self.metrics.parked_expiries.inc()
                self.answer(job, ep.Error(job.seq, ErrorCode.MISSING, self._why_parked(job)).to_frames())
            elif job.retry_at and now >= job.retry_at:
                del self.parked[job.number]
                job.retry_at = 0.0
                self.queue.append(job)

    @staticmethod
    def _why_parked(job: Job) -> str:
        r = job.request
        if isinstance(r, ep.Hello):
            return f"device {r.device_id}: the cloud could not open a session (its content manager did not answer)"
        return (f"device {r.device_id}: position {r.position} could not be served in time (its rows did not "
                f"arrive, or the device stayed busy)")

    def ask_stats(self) -> None:
        """Ask the content manager for its SNAPSHOT (the metrics); on_state takes the answer."""
        if self.state is None:
            return
        try:
            self.state.send_multipart([b"", *sp.Stats().to_frames()], flags=zmq.NOBLOCK)
        except zmq.Again:  # the content manager is not taking messages (restarting): the next ask will do
            pass

    def requeue_parked(self) -> None:
        """Every parked job goes to a worker again (the content manager restarted: its watches are gone)."""
        self.queue.extendleft(self.parked.values())
        self.parked.clear()

    def dispatch(self) -> None:
        """Each free worker gets a batch of what is waiting."""
        for record in self.pool.free_workers():
            if not self.queue:
                return
            batch = self._batch_for(record)
            if not batch:
                continue
            now = time.monotonic()
            record.busy_since = now
            for i, job in enumerate(batch):
                job.attempts += 1
                record.jobs[job.number] = job
                self.at_worker.add(job.request.device_id)
                request = wp.Request(job.number, Frames(job.frames), len(batch) - 1 - i)  # left: still to come
                self.backend.send_multipart([record.identity, *request.to_frames()], copy=False)
            self.metrics.batch_size.observe(len(batch))  # after the sends: the worker starts meanwhile

    def _batch_for(self, record: WorkerRecord) -> list[Job]:
        """Up to `max_batch` waiting jobs for `record`, one a device: its own devices' and new devices', in
        the order they came; the rest stay queued in order."""
        batch: list[Job] = []
        kept: deque[Job] = deque()
        devices: set[int] = set()
        fewest = self.pool.fewest_devices()
        now = time.monotonic()
        for job in self.queue:
            device = job.request.device_id
            if len(batch) < self.max_batch and device not in self.at_worker and device not in devices:
                owner = self.affinity.get(device)
                new = owner is None and (isinstance(job.request, ep.Hello) or record.devices <= fewest)
                if new or owner is not None and owner.worker == record.identity:
                    batch.append(job)
                    devices.add(device)
                    if not isinstance(job.request, ep.Hello):
                        self._serve_at(device, record, now)
                        fewest = self.pool.fewest_devices()
                    continue
            kept.append(job)
        self.queue = kept
        return batch

    def _serve_at(self, device: int, record: WorkerRecord, now: float) -> None:
        """The device's requests go to `record` from now on."""
        owner = self.affinity.get(device)
        if owner is None:
            owner = self.affinity[device] = Affinity(record.identity, now)
            record.devices += 1
        owner.last_used = now
        self.affinity.move_to_end(device)

    def forget_resting(self, now: float) -> None:
        """Devices without a request for AFFINITY_SECONDS no longer count for their worker (a device's lease
        moves to whichever worker serves it next: the content manager hands it over)."""
        while self.affinity:
            device, owner = next(iter(self.affinity.items()))
            if now - owner.last_used < AFFINITY_SECONDS:
                return
            self._unpin(device)

    def _unpin(self, device: int) -> None:
        owner = self.affinity.pop(device)
        record = self.pool.get(owner.worker)
        if record is not None:
            record.devices -= 1

    def heartbeat(self) -> None:
        beat = wp.Heartbeat().to_frames()
        for record in self.pool:
            if record.ready:
                self.backend.send_multipart([record.identity, *beat])

    def purge(self, now: float) -> None:
        for record in self.pool.expired(now):
            self._forget(record)
            self.metrics.workers_dropped.labels("silent").inc()
            log.warning("worker %d is silent: purged (%d ready)", record.pid, self.ready_workers)
        for record in self.pool:
            if record.jobs and now - record.busy_since > self.job_seconds:
                log.warning("worker %d held a batch of %d jobs for more than %g s: dropped", record.pid,
                            len(record.jobs), self.job_seconds)
                self.backend.send_multipart([record.identity, *wp.Disconnect().to_frames()])
                if record.local:  # a pid this broker can vouch for (remote workers only say theirs)
                    self.hung.append(record.pid)
                self._forget(record)
                self.metrics.workers_dropped.labels("hung").inc()

    def _forget(self, record: WorkerRecord) -> None:
        """Drop a worker; its requests go to another (or, retried enough, back as errors), its devices too."""
        self.pool.remove(record)
        for device in [d for d, owner in self.affinity.items() if owner.worker == record.identity]:
            del self.affinity[device]
        for job in reversed(list(record.jobs.values())):
            self.at_worker.discard(job.request.device_id)
            if job.attempts <= self.retries:
                log.warning("job %d of the dead worker %d goes to another worker", job.number, record.pid)
                self.queue.appendleft(job)
            else:
                self.answer(job, ep.Error(job.seq, ErrorCode.WORKER_LOST,
                                          f"the worker died {job.attempts} times on this request").to_frames())
        record.jobs.clear()

    def shutdown(self, linger_ms: int = 200) -> None:
        """Tell every worker to go away; the socket keeps trying for `linger_ms` after it is closed (enough on a
        working network; a worker that misses it notices the broker's silence within its liveness)."""
        for record in self.pool:
            self.backend.send_multipart([record.identity, *wp.Disconnect().to_frames()])
        self.backend.setsockopt(zmq.LINGER, linger_ms)  # LINGER 0 would drop the goodbyes at close


@dataclass
class Affinity:
    """The worker a device's requests go to (it keeps the device's lease)."""

    worker: bytes  # its routing id
    last_used: float  # time.monotonic() of the device's last request dispatched
