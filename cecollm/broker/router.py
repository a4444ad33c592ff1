"""The broker's routing loop: edge requests in, least recently used ready worker out.

Edges talk to the request ROUTER (REQ-style envelopes); workers to the worker ROUTER
(broker_worker protocol). Requests are checked before they are queued (a bad one is answered
with an error at once); a worker that misses `liveness` heartbeats is purged and its request
goes to another worker (up to `retries` times), because the device's state lives in the
content manager, not in the worker.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import zmq

from cecollm.broker.pool import Job, WorkerPool, WorkerRecord
from cecollm.wire import broker_worker as wp
from cecollm.wire import edge_cloud as ep
from cecollm.wire.dispatch import Dispatcher, drain
from cecollm.wire.wire import ErrorCode, Frames, ProtocolError, clip

log = logging.getLogger(__name__)

CHORES_SECONDS = 0.02  # purging silent workers and the on_tick chores run at most this often


class Broker:
    """Routes edge requests to workers; knows nothing about models or state."""

    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket, worker_config: wp.Config,
                 max_queue: int = 1024, retries: int = 1, authorize=None) -> None:
        """`authorize(user_id, device_id)`: whether the key CURVE authenticated may act for the device the
        request names (security.KeyRing.may_act_for); None: no keys (--insecure)."""
        self.frontend = frontend
        self.backend = backend
        self.worker_config = worker_config
        self.max_queue = max_queue
        self.retries = retries
        self.authorize = authorize
        self.interval = worker_config.heartbeat_ms / 1000
        self.pool = WorkerPool(self.interval, worker_config.liveness)
        self.queue: deque[Job] = deque()
        self._jobs = 0
        self.running = True
        self.bad_messages = 0
        self.failures = 0  # messages a handler failed on (bugs, logged)
        self.from_worker = Dispatcher({wp.Connect: self.on_connect, wp.Ready: self.on_ready,
                                       wp.Heartbeat: self.on_heartbeat, wp.Reply: self.on_reply})

    @property
    def ready_workers(self) -> int:
        return self.pool.ready_count

    def serve(self, on_tick=None) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        next_beat = next_chores = time.monotonic()
        while self.running:
            ready = dict(poller.poll(max(1, int(self.interval * 1000))))
            if self.backend in ready:
                self.failures += drain(self.backend, self.on_worker, log)
            if self.frontend in ready:
                self.failures += drain(self.frontend, self.on_edge, log)
            self.dispatch()
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat()
                next_beat = now + self.interval
            if now >= next_chores:  # not on every message: a request passes this loop twice
                self.purge(now)
                if on_tick:
                    on_tick(self)
                next_chores = now + CHORES_SECONDS

    # ---- edges ---------------------------------------------------------------------------
    def on_edge(self, frames) -> None:
        client = frames[0].bytes
        if len(frames) < 2 or len(frames[1].buffer) != 0:
            self._refuse(client, 0, "expected [empty delimiter, message] (send like REQ)")
            return
        try:
            msg = ep.parse(frames[2:], ep.REQUESTS)
        except ProtocolError as exc:
            self._refuse(client, 0, str(exc))
            return
        if self.authorize is not None and not self.authorize(frames[-1].get("User-Id"), msg.device_id):
            self.bad_messages += 1
            log.warning("edge request refused: a key acted for device %d, which it may not", msg.device_id)
            self.reply(client, ep.Error(msg.seq, ErrorCode.FORBIDDEN, f"this key may not act for device "
                                        f"{msg.device_id}").to_frames())
            return
        if len(self.queue) >= self.max_queue:
            self.reply(client, ep.Error(msg.seq, ErrorCode.BUSY, "the broker's queue is full").to_frames())
            return
        self._jobs += 1
        self.queue.append(Job(self._jobs, client, msg.seq, tuple(frames[2:])))

    def _refuse(self, client: bytes, seq: int, why: str) -> None:
        self.bad_messages += 1
        log.warning("edge request refused: %s", why)
        self.reply(client, ep.Error(seq, ErrorCode.MALFORMED, clip(why)).to_frames())

    def reply(self, client: bytes, frames) -> None:
        self.frontend.send_multipart([client, b"", *frames], copy=False)

    # ---- workers -------------------------------------------------------------------------
    def on_worker(self, frames) -> None:
        identity = frames[0].bytes
        try:
            msg = wp.parse(frames[1:], self.from_worker.commands)
        except ProtocolError as exc:
            self._refuse_worker(identity, str(exc))
            return
        record = self.pool.get(identity)
        if record is None and not isinstance(msg, wp.Connect):
            log.warning("message from an unknown worker; told to go away")
            self.backend.send_multipart([identity, *wp.Disconnect().to_frames()])
            return
        self.from_worker(msg, identity, record, time.monotonic())

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
        self.pool.heard(record, now)
        job = record.job
        if job is None or job.number != msg.job:
            self._refuse_worker(identity, f"worker {record.pid} answered job {msg.job} it does not hold")
            return
        self.reply(job.client, msg.payload)
        self.pool.free(record, now)

    def dispatch(self) -> None:
        while self.queue:
            record = self.pool.next_free()
            if record is None:
                return
            job = self.queue.popleft()
            job.attempts += 1
            record.job = job
            request = wp.Request(job.number, Frames(job.frames))
            self.backend.send_multipart([record.identity, *request.to_frames()], copy=False)

    def heartbeat(self) -> None:
        beat = wp.Heartbeat().to_frames()
        for record in self.pool:
            if record.ready:
                self.backend.send_multipart([record.identity, *beat])

    def purge(self, now: float) -> None:
        for record in self.pool.expired(now):
            self._forget(record)
            log.warning("worker %d is silent: purged (%d ready)", record.pid, self.ready_workers)

    def _forget(self, record: WorkerRecord) -> None:
        """Drop a worker; its request goes to another (or, retried enough, back as an error)."""
        self.pool.remove(record)
        job = record.job
        if job is not None:
            if job.attempts <= self.retries:
                log.warning("job %d of the dead worker %d goes to another worker", job.number, record.pid)
                self.queue.appendleft(job)
            else:
                self.reply(job.client, ep.Error(job.seq, ErrorCode.WORKER_LOST,
                                                f"the worker died {job.attempts} times on this request").to_frames())

    def shutdown(self, linger_ms: int = 1000) -> None:
        """Tell every worker to go away; the socket keeps trying for `linger_ms` after it is closed."""
        for record in self.pool:
            self.backend.send_multipart([record.identity, *wp.Disconnect().to_frames()])
        self.backend.setsockopt(zmq.LINGER, linger_ms)  # LINGER 0 would drop the goodbyes at close
