"""The broker's routing loop: edge requests in, least recently used ready worker out.

Edges talk to the request ROUTER (REQ-style envelopes); workers to the worker ROUTER
(worker_protocol). Requests are checked before they are queued (a bad one is answered with an
error at once); a worker that misses `liveness` heartbeats is purged and its request goes to
another worker (up to `retries` times), because the device's state lives in the content
manager, not in the worker.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import zmq

from cecollm.broker import edge_protocol as ep
from cecollm.broker import worker_protocol as wp
from cecollm.broker.loop import drain
from cecollm.broker.wire import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

CHORES_SECONDS = 0.02  # purging silent workers and the on_tick chores run at most this often


@dataclass
class Job:
    """One edge request on its way through the broker."""

    number: int
    client: bytes  # the edge's routing id on the request socket
    seq: int  # the edge's request seq (for an error reply)
    frames: tuple  # the edge's message, forwarded untouched
    attempts: int = 0  # workers it was sent to


@dataclass
class WorkerRecord:
    """What the broker knows about one worker."""

    identity: bytes  # routing id on the worker socket
    pid: int
    expires: float  # purged when no message arrives before this
    ready: bool = False  # loaded and serving
    job: Job | None = None  # the request it is working on
    free_since: float = 0.0  # when it last became free: the least recently used free worker goes first


class Broker:
    """Routes edge requests to workers; knows nothing about models or state."""

    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket, worker_config: wp.Config,
                 max_queue: int = 1024, retries: int = 1) -> None:
        self.frontend = frontend
        self.backend = backend
        self.worker_config = worker_config
        self.max_queue = max_queue
        self.retries = retries
        self.interval = worker_config.heartbeat_ms / 1000
        self.workers: dict[bytes, WorkerRecord] = {}
        self.queue: deque[Job] = deque()
        self._jobs = 0
        self.running = True
        self.bad_messages = 0
        self.failures = 0  # messages a handler failed on (bugs, logged)

    @property
    def ready_workers(self) -> int:
        return sum(1 for w in self.workers.values() if w.ready)

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
                self.heartbeat(now)
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
        if len(self.queue) >= self.max_queue:
            self.reply(client, ep.Error(msg.seq, ErrorCode.BUSY, "the broker's queue is full").to_frames())
            return
        self._jobs += 1
        self.queue.append(Job(self._jobs, client, msg.seq, tuple(frames[2:])))

    def _refuse(self, client: bytes, seq: int, why: str) -> None:
        self.bad_messages += 1
        log.warning("edge request refused: %s", why)
        self.reply(client, ep.Error(seq, ErrorCode.MALFORMED, why).to_frames())

    def reply(self, client: bytes, frames) -> None:
        self.frontend.send_multipart([client, b"", *frames], copy=False)

    # ---- workers -------------------------------------------------------------------------
    def on_worker(self, frames) -> None:
        identity = frames[0].bytes
        try:
            msg = wp.parse(frames[1:], (wp.Command.CONNECT, wp.Command.READY, wp.Command.HEARTBEAT, wp.Command.REPLY))
        except ProtocolError as exc:
            self.bad_messages += 1
            log.warning("worker message refused: %s", exc)
            self.backend.send_multipart([identity, *wp.Error(str(exc)).to_frames()])
            return
        now = time.monotonic()
        record = self.workers.get(identity)
        if isinstance(msg, wp.Connect):
            if record is not None:  # the same peer starts over: what it held goes to another worker
                self._forget(record)
            self.workers[identity] = WorkerRecord(identity, msg.pid, now + 120.0)  # loading may take a while
            self.backend.send_multipart([identity, *self.worker_config.to_frames()])
            return
        if record is None:
            log.warning("message from an unknown worker; told to go away")
            self.backend.send_multipart([identity, *wp.Disconnect().to_frames()])
            return
        record.expires = now + self.interval * self.worker_config.liveness
        if isinstance(msg, wp.Ready) and not record.ready:
            record.ready, record.free_since = True, now
            log.info("worker %d ready (%d ready)", record.pid, self.ready_workers)
        elif isinstance(msg, wp.Reply):
            job = record.job
            if job is None or job.number != msg.job:
                self.bad_messages += 1
                log.warning("worker message refused: worker %d answered job %d it does not hold", record.pid, msg.job)
                self.backend.send_multipart([identity, *wp.Error(f"job {msg.job} is not yours").to_frames()])
                return
            self.reply(job.client, msg.payload)
            record.job, record.free_since = None, now

    def dispatch(self) -> None:
        while self.queue:
            free = [w for w in self.workers.values() if w.ready and w.job is None]
            if not free:
                return
            record = min(free, key=lambda w: w.free_since)
            job = self.queue.popleft()
            job.attempts += 1
            record.job = job
            self.backend.send_multipart([record.identity, *wp.Request(job.number, job.frames).to_frames()], copy=False)

    def heartbeat(self, now: float) -> None:
        for record in self.workers.values():
            if record.ready:
                self.backend.send_multipart([record.identity, *wp.Heartbeat().to_frames()])

    def purge(self, now: float) -> None:
        for record in list(self.workers.values()):
            if now > record.expires:
                self._forget(record)
                log.warning("worker %d is silent: purged (%d ready)", record.pid, self.ready_workers)

    def _forget(self, record: WorkerRecord) -> None:
        """Drop a worker; its request goes to another (or, retried enough, back as an error)."""
        del self.workers[record.identity]
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
        for record in self.workers.values():
            self.backend.send_multipart([record.identity, *wp.Disconnect().to_frames()])
        self.backend.setsockopt(zmq.LINGER, linger_ms)  # LINGER 0 would drop the goodbyes at close
