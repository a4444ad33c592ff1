"""The broker's book of workers: who is connected, ready, busy, and when each was last heard.

One `WorkerRecord` per worker. A free worker takes a batch of waiting jobs (its own devices'
first: a device's requests go to the worker that served it last, which keeps its lease); a
worker that sends nothing for `liveness` heartbeats is dead (its jobs go to another).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOADING_SECONDS = 120.0  # a worker that connected may take this long to load before it is silent


@dataclass
class Job:
    """One edge request on its way through the broker."""

    number: int
    client: bytes  # the edge's routing id on the request socket
    seq: int  # the edge's request seq (for an error reply)
    frames: tuple  # the edge's message, forwarded untouched
    request: object  # the same message parsed (edge_cloud.Hello/Decide/Verify): its device, session, position
    attempts: int = 0  # workers it failed on, or is at
    park_until: float = 0.0  # once parked: when it stops waiting for its rows
    retry_at: float = 0.0  # a parked HELLO: when it goes out again
    arrived: float = 0.0  # time.monotonic() when the broker got it (the latency metric)


@dataclass
class WorkerRecord:
    """What the broker knows about one worker."""

    identity: bytes  # routing id on the worker socket
    pid: int
    expires: float  # purged when no message arrives before this
    ready: bool = False  # loaded and serving
    jobs: dict[int, Job] = field(default_factory=dict)  # job number -> a request of the batch it is working on
    busy_since: float = 0.0  # when it got that batch
    devices: int = 0  # devices whose requests go to this worker (it keeps their leases)
    local: bool = False  # connected with the key of the workers this broker started (its children)
    free_since: float = 0.0  # when it last became free: the least recently used free worker goes first


class WorkerPool:
    """Every worker the broker knows, by routing id."""

    def __init__(self, interval: float, liveness: int) -> None:
        self.interval = interval  # heartbeat interval, seconds
        self.liveness = liveness  # beats a worker may miss
        self.records: dict[bytes, WorkerRecord] = {}

    def __iter__(self):
        return iter(list(self.records.values()))

    def get(self, identity: bytes) -> WorkerRecord | None:
        return self.records.get(identity)

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.records.values() if w.ready)

    def connect(self, identity: bytes, pid: int, now: float) -> WorkerRecord:
        record = self.records[identity] = WorkerRecord(identity, pid, now + LOADING_SECONDS)
        return record

    def heard(self, record: WorkerRecord, now: float) -> None:
        record.expires = now + self.interval * self.liveness

    def done(self, record: WorkerRecord, job: Job, now: float) -> None:
        """The worker answered `job`; with the batch's last answer it is free."""
        del record.jobs[job.number]
        if not record.jobs:
            record.free_since = now

    def free_workers(self) -> list[WorkerRecord]:
        """The ready workers without a batch, the one free longest first."""
        return sorted((w for w in self.records.values() if w.ready and not w.jobs), key=lambda w: w.free_since)

    def fewest_devices(self) -> int:
        """The fewest devices any ready worker serves (a new device goes to a worker that has no more)."""
        return min((w.devices for w in self.records.values() if w.ready), default=0)

    def expired(self, now: float) -> list[WorkerRecord]:
        return [w for w in self.records.values() if now > w.expires]

    def remove(self, record: WorkerRecord) -> None:
        del self.records[record.identity]
