"""The edge server's device: one EdgeClient, and the one thread that runs its generations in order.

Requests are admitted into a bounded queue (past it they are refused, the caller answers 429)
and run one at a time, first come first served, on a single worker thread: torch compute and
the client's ZeroMQ sockets never touch the event loop. A job's tokens are turned into text on
that thread and handed to the event loop as they come; a job whose client left is stopped at
its next token (on_token raises ClientGone, and EdgeClient.generate tells the cloud the
generation ended, so the cloud releases the device's state at once).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from cecollm.edge.client import EdgeClient
from cecollm.edge.metrics import ServerMetrics
from cecollm.edge.openai_api import ApiError, TextCutter
from cecollm.edge.session import CloudGone, EdgeResult
from cecollm.errors import UserError
from cecollm.generation import StopGeneration

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The HTTP client of a job went away: its generation stops."""


@dataclass(eq=False)
class Job:
    """One request's generation: what to generate, and (once done) what came of it."""

    prompt_ids: list[int]
    max_tokens: int
    stops: list[str]
    arrived: float  # time.perf_counter() when the request came in
    events: asyncio.Queue | None = None  # streaming: ("text", str) ..., then ("end", exception or None)
    loop: asyncio.AbstractEventLoop | None = None
    gone: threading.Event = field(default_factory=threading.Event)  # the client left: stop
    number: int = 0  # admission order
    served: int = 0  # the order in which the device started it (equal to `number` when served in order)
    future: Future | None = None
    queue_seconds: float = 0.0
    result: EdgeResult | None = None
    text: str = ""
    finish_reason: str = "stop"

    def emit(self, kind: str, value) -> None:
        if self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server stopped, nobody reads this any more
            self.gone.set()


class Device:
    """Runs jobs on one EdgeClient, one at a time, in the order they were admitted."""

    PROBE_AFTER = 30.0  # /health asks the cloud itself when it has not answered for this long

    def __init__(self, client: EdgeClient, tokenizer, queue_limit: int, metrics: ServerMetrics) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.queue_limit = queue_limit
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="edge-generate")
        self.lock = threading.Lock()
        self.waiting = self.running = self.admitted = self.started = 0
        self.live: set[Job] = set()
        self.mean_seconds = 1.0  # moving average of a generation's duration, for Retry-After
        self.cloud_answered: float | None = None  # time.monotonic() of the cloud's last answer
        self.cloud_problem = ""  # why the cloud did not serve the last generation (or probe)
        self._probing = False

    # ---- the queue -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue the job, or an ApiError 429 (with Retry-After) when the queue is full."""
        with self.lock:
            if self.waiting >= self.queue_limit and not self.idle:  # an idle device takes one even with --queue 0
                wait = max(1, math.ceil(self.mean_seconds * (self.waiting + self.running)))
                self.metrics.rejected.inc()
                raise ApiError(429, f"the device is busy: {self.waiting} requests are waiting (at most "
                                    f"{self.queue_limit}); retry in {wait} s", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
            self.waiting += 1
            self.admitted += 1
            job.number = self.admitted
            self.live.add(job)
            self.metrics.waiting.inc()
            job.future = self.executor.submit(self._work, job)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self._probing)

    def close(self) -> None:
        """Stop every job at its next token and wait for the worker thread."""
        with self.lock:
            for job in self.live:
                job.gone.set()
        self.executor.shutdown(wait=True, cancel_futures=True)

    # ---- one job, on the worker thread -----------------------------------------------------
    def _work(self, job: Job) -> Job:
        m = self.metrics
        with self.lock:
            self.waiting -= 1
            self.running += 1
            self.started += 1
            job.served = self.started
        m.waiting.dec()
        m.running.inc()
        start = time.perf_counter()
        job.queue_seconds = start - job.arrived
        m.queue_time.observe(job.queue_seconds)
        error = None
        try:
            if job.gone.is_set():
                raise ClientGone("the client left while the request waited")
            self._generate(job)
            m.e2e.observe(time.perf_counter() - job.arrived)
            return job
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self.lock:
                self.running -= 1
                self.live.discard(job)
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - start)
            m.running.dec()
            job.emit("end", error)

    def _generate(self, job: Job) -> None:
        m, cutter = self.metrics, TextCutter(self.tokenizer, job.stops)
        last = None

        def on_token(record) -> None:
            nonlocal last
            if job.gone.is_set():
                raise ClientGone("the client left during the generation")
            now = time.perf_counter()
            if last is None:
                m.ttft.observe(now - job.arrived)
            else:
                m.itl.observe(now - last)
            last = now
            text = cutter.add(record.token_id)
            if text:
                job.emit("text", text)
            if cutter.stopped:
                raise StopGeneration

        result = self.client.generate(job.prompt_ids, on_token, job.max_tokens)
        rest = cutter.finish()
        if rest:
            job.emit("text", rest)
        job.result, job.text = result, cutter.text
        ended = cutter.stopped or (result.token_ids and result.token_ids[-1] in self.client.eos)
        job.finish_reason = "length" if not ended and len(result.token_ids) >= job.max_tokens else "stop"
        m.record_generation(result.stats)
        self._note_cloud(result.stats.standalone_reason)

    # ---- the cloud's health ----------------------------------------------------------------
    def _note_cloud(self, problem: str) -> None:
        """A generation (or probe) that opened a session heard the cloud; one that went alone says why not."""
        if self.client.config.standalone:
            return
        if problem:
            self.cloud_problem = problem
        else:
            self.cloud_answered, self.cloud_problem = time.monotonic(), ""

    def probe(self, timeout: float | None = None) -> None:
        """Ask the cloud to open and close a session (worker thread only). A UserError (another model or
        split) propagates; a cloud that does not answer is noted."""
        try:
            self.client.probe(timeout)
            self._note_cloud("")
        except CloudGone as exc:
            self._note_cloud(str(exc))

    async def probe_if_stale(self, timeout: float) -> None:
        """Probe when the cloud has not answered for a while and the device has nothing else to do."""
        if self.client.config.standalone or not self.idle:
            return
        if self.cloud_answered is not None and time.monotonic() - self.cloud_answered < self.PROBE_AFTER:
            return
        self._probing = True
        try:
            await asyncio.wrap_future(self.executor.submit(self._quiet_probe, timeout))
        finally:
            self._probing = False

    def _quiet_probe(self, timeout: float) -> None:
        try:
            self.probe(timeout)
        except UserError as exc:  # the cloud now serves another model or split
            self._note_cloud(str(exc))

    def cloud_health(self) -> dict:
        if self.client.config.standalone:
            return {"used": False}
        ago = None if self.cloud_answered is None else round(time.monotonic() - self.cloud_answered, 3)
        return {"used": True, "reachable": not self.cloud_problem and ago is not None,
                "seconds_since_answer": ago, "problem": self.cloud_problem or None,
                "capacity": self.client.capacity}
