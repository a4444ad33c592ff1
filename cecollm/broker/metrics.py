"""The broker's Prometheus metrics (`cecollm-broker --metrics HOST:PORT`, GET /metrics).

Named as vLLM and llama.cpp name theirs: a `cecollm_` prefix, `_total` for counters, `_seconds`
for durations, `_bytes` for sizes. The broker process serves them over HTTP (prometheus-client's
own server, on a thread of its own). What the broker sees itself (edge requests and their
latency, tokens, workers, parked requests, frames it refused) is counted here as it happens, by
the routing loop. What the content manager holds and counts (sessions, shared-memory bytes,
evictions, uploads, frames it refused) lives in another process: it answers the broker's STATS
with a SNAPSHOT twice a second (wire/worker_state.py), and a scrape reads the latest one. A
content manager that died took its counters with it: the broker keeps the last SNAPSHOT of each,
so the exported counters never go down.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from cecollm.cliutil import tcp_address
from cecollm.errors import UserError
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.wire import HEADER, ErrorCode, ProtocolError, buffer_of

STATS_SECONDS = 0.5  # how often the broker asks the content manager for its SNAPSHOT while it exports metrics
COMMANDS = {ep.Hello: "hello", ep.Decide: "decide", ep.Verify: "verify"}  # request type -> `command` label
OTHER = "other"  # the command of a request that could not be read
OK = "ok"  # the result of a request that got its WELCOME or TOKEN (else: its ErrorCode, lower case)
# a request's time in the broker: a token from a warm worker takes milliseconds, a request parked for its
# rows up to --wait-seconds, one whose worker hung up to --job-seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)
BROKER_SOCKETS = ("requests", "workers", "manager")  # the broker's sockets: edges', workers', the content manager's
# the content manager's counters, as SNAPSHOT names them: (metric, label value)
MANAGER_COUNTERS = {
    "evictions": ("evictions", "budget"), "idle_releases": ("evictions", "idle"),
    "uploads_taken": ("upload_messages", "ok"), "uploads_refused": ("upload_messages", "refused"),
    "uploads_stale": ("upload_messages", "stale"),
    "upload_network_bytes": ("upload_bytes", "network"), "upload_shm_bytes": ("upload_bytes", "shm"),
    "refused_upload_frames": ("refused_frames", "uploads"), "refused_state_frames": ("refused_frames", "state"),
}


def result_of(frames) -> str:
    """The `result` label of a reply to an edge: "ok", or the code of its ERROR in lower case ("other": not a
    reply of the edge boundary, as a remote worker may send)."""
    try:
        tag, version, command = HEADER.unpack(buffer_of(frames[0]))
        if tag != ep.TAG or version != ep.VERSION:
            return OTHER
        if command != ep.Command.ERROR:
            return OK
        return error_label(ep.parse(frames).code)  # only an error's body is read
    except (ProtocolError, IndexError, TypeError, struct.error):  # a remote worker's reply that is not one
        return OTHER


def error_label(code: ErrorCode) -> str:
    """The `result` label of a refusal with `code`."""
    return code.name.lower()


def command_of(frames) -> str:
    """The `command` label of a request that could not be parsed: its header's, if that names a request."""
    try:
        tag, version, command = HEADER.unpack(buffer_of(frames[0]))
    except (IndexError, TypeError, struct.error):
        return OTHER
    if tag != ep.TAG or version != ep.VERSION or command not in ep.REQUESTS:
        return OTHER
    return ep.Command(command).name.lower()


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class BrokerMetrics:
    """Every metric of one broker (its own registry: several brokers in one process never share counts)."""

    def __init__(self, budget_bytes: int = 0) -> None:
        self.registry = r = CollectorRegistry()
        self.budget_bytes = budget_bytes
        self.requests = Counter("cecollm_edge_requests", "Edge requests answered, by command (hello, decide, "
                                "verify; other: unreadable) and result (ok, or the error code: busy, forbidden, "
                                "malformed, missing, unknown_device, ...).", ["command", "result"], registry=r)
        self.latency = Histogram("cecollm_edge_request_latency_seconds", "From the broker receiving an edge "
                                 "request to its reply, for requests that went to a worker (queued, parked and "
                                 "computed), by command.", ["command"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("cecollm_cloud_tokens", "Tokens the cloud decided (a TOKEN reply), by command.",
                              ["command"], registry=r)
        self.worker_restarts = Counter("cecollm_worker_restarts", "Dead workers this broker started that were "
                                       "replaced by a new process.", registry=r)
        self.manager_restarts = Counter("cecollm_content_manager_restarts", "Dead content managers replaced by a "
                                        "new process (every device's state was lost).", registry=r)
        self.workers_dropped = Counter("cecollm_workers_dropped", "Workers dropped: hung (held one request past "
                                       "--job-seconds) or silent (missed --liveness heartbeats).", ["reason"],
                                       registry=r)
        self.parked_expiries = Counter("cecollm_parked_request_expiries", "Parked requests answered MISSING "
                                       "(their rows did not arrive within --wait-seconds).", registry=r)
        self.batch_size = Histogram("cecollm_broker_batch_size", "Requests in each batch handed to a worker (requests "
                                    "of different devices it computes in one pass).", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.parked = Gauge("cecollm_num_requests_parked", "Requests parked, waiting for their rows (they hold no "
                            "worker).", registry=r)
        self.waiting = Gauge("cecollm_num_requests_waiting", "Requests queued for a free worker.", registry=r)
        self.refused_here = dict.fromkeys(BROKER_SOCKETS, 0)  # frames the broker refused, by socket (the collector)
        self._manager: tuple[dict[str, int], sp.Snapshot | None] = ({}, None)  # dead managers' sums, the latest
        self._gone: set[int] = set()  # pids of content managers that died (a late SNAPSHOT of one is ignored)
        self._requests: dict[tuple[str, str], object] = {}  # (command, result) -> its child, looked up once
        self._latency = {c: self.latency.labels(c) for c in COMMANDS.values()}
        for command in COMMANDS.values():  # every usual series is there from the start, at 0
            self._requests[command, OK] = self.requests.labels(command, OK)
        for reason in ("hung", "silent"):
            self.workers_dropped.labels(reason)
        self._tokens = {c: self.tokens.labels(c) for c in ("decide", "verify")}
        r.register(_ManagerCollector(self))

    def track(self, broker) -> None:
        """Read the broker's parked requests and queue at each scrape (a len() of each: no lock needed)."""
        self.parked.set_function(lambda: len(broker.parked))
        self.waiting.set_function(lambda: len(broker.queue))

    # ---- the routing loop's calls (one dictionary lookup and an increment each) ------------
    def count(self, command: str, result: str) -> None:
        child = self._requests.get((command, result))
        if child is None:
            child = self._requests[command, result] = self.requests.labels(command, result)
        child.inc()

    def answered(self, request, arrived: float, frames) -> None:
        """A request that went to a worker (`arrived`: time.monotonic() when the broker got it) was answered."""
        command = COMMANDS[type(request)]
        result = result_of(frames)
        self.count(command, result)
        self._latency[command].observe(time.monotonic() - arrived)
        if result == OK and command in self._tokens:
            self._tokens[command].inc()

    def refused_frame(self, sock: str) -> None:
        self.refused_here[sock] += 1

    # ---- the content manager's SNAPSHOTs ---------------------------------------------------
    def on_snapshot(self, snapshot: sp.Snapshot) -> None:
        if snapshot.pid in self._gone:
            return
        base, last = self._manager
        if last is not None and last.pid != snapshot.pid:  # another content manager: keep what the last one counted
            base = _added(base, last)
        self._manager = (base, snapshot)  # one assignment: a scrape sees the old pair or the new one

    def manager_lost(self, pid: int) -> None:
        """The content manager `pid` died: its counts stay, its sessions and bytes are gone."""
        self._gone.add(pid)
        base, last = self._manager
        if last is not None and last.pid == pid:
            self._manager = (_added(base, last), None)

    @property
    def latest(self) -> sp.Snapshot | None:
        """The live content manager's latest SNAPSHOT (None before its first, or once it died)."""
        return self._manager[1]

    def manager_counts(self) -> dict[str, int]:
        """Every content manager's counters added up (the SNAPSHOT's names)."""
        base, last = self._manager
        return _added(base, last) if last is not None else dict(base)

    # ---- exposition ------------------------------------------------------------------------
    def text(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, address: str):
        """Serve GET /metrics on HOST:PORT (":PORT" or "PORT": loopback) on a thread; the HTTP server (its
        `server_address` is where it listens; shutdown() and server_close() stop it). A UserError in one line
        for an address that is malformed or cannot be listened on."""
        host, port = tcp_address(address, "--metrics", "127.0.0.1:9100")[4][:2]
        try:
            server, _ = start_http_server(port, host, registry=self.registry)
        except (OSError, UnicodeError, OverflowError) as exc:
            raise UserError(f"--metrics {address!r}: cannot listen there: {getattr(exc, 'strerror', None) or exc}") \
                from None
        return server


def _added(base: dict[str, int], snapshot: sp.Snapshot) -> dict[str, int]:
    return {name: base.get(name, 0) + getattr(snapshot, name) for name in MANAGER_COUNTERS}


class _ManagerCollector:
    """The metrics built at each scrape: the content manager's (latest SNAPSHOT plus the dead ones') and the
    frames the broker refused."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        last, counts = m.latest, m.manager_counts()  # (a SNAPSHOT arriving in between shows at the next scrape)
        yield GaugeMetricFamily("cecollm_active_devices", "Device sessions the content manager holds.",
                                value=last.devices if last else 0)
        yield GaugeMetricFamily("cecollm_shm_used_bytes", "Shared memory the sessions' segments take.",
                                value=last.used_bytes if last else 0)
        yield GaugeMetricFamily("cecollm_shm_budget_bytes", "Shared memory all sessions may take (--budget-mb).",
                                value=m.budget_bytes)
        families = {
            "evictions": CounterMetricFamily("cecollm_evictions", "Device sessions released by the content "
                                             "manager: to make room in the byte budget (budget) or idle past "
                                             "--idle-ttl (idle).", labels=["reason"]),
            "upload_messages": CounterMetricFamily("cecollm_upload_messages", "Messages on the upload socket: "
                                                   "taken (ok: rows or END), refused (unreadable, another device's "
                                                   "key, a session not open, rows out of order) or stale (rows of "
                                                   "a rolled-back epoch, dropped).", labels=["result"]),
            "upload_bytes": CounterMetricFamily("cecollm_upload_bytes", "Bytes of hidden-state rows taken, sent "
                                                "over the network or written into shared memory by the edge.",
                                                labels=["via"]),
            "refused_frames": CounterMetricFamily("cecollm_refused_frames", "Messages that could not be read, by "
                                                  "socket: requests (edges), workers, manager (the content "
                                                  "manager's, at the broker), uploads and state (at the content "
                                                  "manager).", labels=["socket"]),
        }
        for sock, n in list(m.refused_here.items()):
            families["refused_frames"].add_metric([sock], n)
        for name, (family, label) in MANAGER_COUNTERS.items():
            families[family].add_metric([label], counts.get(name, 0))
        yield from families.values()
