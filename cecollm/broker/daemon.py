"""The cloud daemon (`cecollm-broker`): the routing loop, the content manager and the workers it starts.

The broker loads the model's configuration once (weights mapped, not copied) for its identity and
split, starts the content manager and waits for its READY, starts the workers (each announces
itself over the worker protocol), and routes until it is told to stop; then it stops its
children and removes what they left (shared-memory segments, ipc socket files).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cecollm.config import DEFAULT_MODEL
from cecollm.dtypes import default_dtype
from cecollm.errors import CecollmError, UserError
from cecollm.runtime import ReadyWaiter, run_daemon
from cecollm.wire import broker_worker as wp
from cecollm.wire import launch
from cecollm.wire.security import DEVICES, WORKERS, KeyRing, default_dir, loopback_only
from cecollm.wire.wire import MAX_BODY

log = logging.getLogger("cecollm.broker")

MANAGER_START_SECONDS = 60.0  # the content manager binds its sockets within this, or the broker gives up
MANAGER_RESTARTS = 10  # content managers started after the first died, before the broker gives up


@dataclass(frozen=True)
class BrokerConfig:
    """How the broker daemon runs; the click options take their defaults from here."""

    request_address: str = "tcp://127.0.0.1:5555"  # edges' requests (ROUTER, bound here); commas bind several;
    #                                                tcp://*:5555 serves other hosts
    upload_address: str = "tcp://127.0.0.1:5556"  # edges' uploads (PULL, bound by the content manager); commas too
    worker_address: str = "tcp://127.0.0.1:5557"  # workers connect here (ROUTER, bound here)
    state_address: str = ""  # the content manager's control socket; "" = ipc:// in the temp dir (tcp://*:PORT for
    #                           workers on other hosts)
    model: str = DEFAULT_MODEL  # a transformers directory, a .gguf file, or the default model's name
    exits: str = ""  # exits as layer counts, "8,15"; "" = the model's default split
    upload_layer: int = 0  # layer whose output the edges upload; 0 = the last exit
    heads: str = ""  # heads file whose exits define the split (the cloud never runs heads)
    dtype: str = field(default_factory=default_dtype)  # compute dtype (workers load in it, edges must use it);
    #                                                    default: the machine's (dtypes.default_dtype)
    workers: int = 1  # worker processes to start
    heartbeat_ms: int = 250  # heartbeat interval between broker and workers
    liveness: int = 4  # heartbeats a worker may miss before it is purged
    capacity: int = 1024  # positions per device session (prompt + generated)
    budget_mb: int = 1024  # shared memory for all device sessions together
    idle_ttl: float = 600.0  # seconds before an idle device's state is released
    wait_seconds: float = 2.0  # how long a request waits for its rows still in flight
    max_queue: int = 1024  # requests waiting for a worker before new ones are refused
    retries: int = 1  # times a request whose worker died is handed to another
    threads: int = 1  # torch threads per worker
    job_seconds: float = 60.0  # a worker that holds one request longer is dropped (ours are killed and restarted)
    claim_seconds: float = 30.0  # a device's session used within this long is its edge's: another edge is refused
    max_per_device: int = 4  # requests one device may have in the broker (queued, parked or computing)
    max_batch: int = 16  # requests of different devices a worker computes in one pass (1: one at a time)
    keys: str = ""  # the keys directory (`cecollm keys`); "" = $CECOLLM_HOME/keys
    insecure: bool = False  # no keys and no encryption: every socket binds loopback only
    metrics: str = ""  # HOST:PORT to serve Prometheus metrics on (GET /metrics; ":PORT" = loopback); "" = none
    verbose: bool = False  # debug logging


def endpoints(text: str) -> list[str]:
    """The endpoints of a comma-separated address option, each tcp:// or ipc://."""
    found = [e.strip() for e in text.split(",") if e.strip()]
    if not found:
        raise UserError("an address is empty")
    for e in found:
        if not e.startswith(("tcp://", "ipc://")):
            raise UserError(f"address {e!r} must start with tcp:// or ipc://")
    return found


def connectable(address: str) -> str:
    """The address a peer on this host connects to for a bound `address` (tcp://*:P -> 127.0.0.1:P)."""
    return address.replace("//*:", "//127.0.0.1:").replace("//0.0.0.0:", "//127.0.0.1:")


def _bind(sock, endpoints: list[str], what: str) -> None:
    import zmq

    for e in endpoints:
        try:
            sock.bind(e)
        except zmq.ZMQError as exc:
            raise UserError(f"cannot bind the {what} socket to {e}: {exc}") from None


@dataclass(frozen=True)
class _Plan:
    """What the broker sets up, worked out from its config and the model."""

    requests: list[str]  # endpoints the request socket binds
    uploads: list[str]  # endpoints the content manager's upload socket binds
    state_address: str  # the content manager's control socket
    segment_prefix: str  # this broker's shared-memory segments start with it
    split_text: str  # the split, for the startup line
    manager: object  # ContentManagerConfig
    worker: wp.Config  # sent to every worker that connects
    worker_address: str  # where workers connect (bound here)
    ring: object  # security.KeyRing, or None with --insecure
    local_keys: object  # security.ClientKeys of the workers this broker starts (None with --insecure)


def _check(config: BrokerConfig) -> None:
    for name, value, low in (("--workers", config.workers, 0), ("--capacity", config.capacity, 1),
                             ("--budget-mb", config.budget_mb, 1), ("--heartbeat-ms", config.heartbeat_ms, 10),
                             ("--liveness", config.liveness, 1), ("--threads", config.threads, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if config.idle_ttl <= 0 or config.wait_seconds <= 0 or config.job_seconds <= 0 or config.claim_seconds < 0:
        raise UserError("--idle-ttl, --wait-seconds and --job-seconds must be positive, --claim-seconds not negative")
    if not 1 <= config.max_batch <= wp.MAX_BATCH:
        raise UserError(f"--max-batch must be 1 to {wp.MAX_BATCH}, got {config.max_batch}")
    if config.max_per_device < 1:
        raise UserError(f"--max-per-device must be at least 1, got {config.max_per_device}")


def _plan(config: BrokerConfig) -> _Plan:
    """Check the options, load the model (mapped) once for its identity and split."""
    from cecollm.cache import shm
    from cecollm.cache.content_manager import ContentManagerConfig
    from cecollm.spec import ModelSpec

    requests, uploads = endpoints(config.request_address), endpoints(config.upload_address)
    for address in (config.worker_address, config.state_address or "ipc://"):
        if len(endpoints(address)) != 1:
            raise UserError(f"address {address!r}: one endpoint only")
    _check(config)
    worker_address, state_address = config.worker_address, config.state_address
    ring = local_keys = None
    if config.insecure:
        requests, uploads = [loopback_only(e) for e in requests], [loopback_only(e) for e in uploads]
        worker_address = loopback_only(worker_address)
        state_address = state_address and loopback_only(state_address)
    else:
        ring = KeyRing(config.keys or default_dir())
        local_keys = ring.local_worker_keys()
    spec = ModelSpec.from_options(config.model, config.exits, config.upload_layer, config.heads, config.dtype)
    loaded = spec.load(mapped=True)
    split = spec.resolve(loaded).split
    c = loaded.model.config
    pid = os.getpid()
    state_address = state_address or f"ipc://{tempfile.gettempdir()}/cecollm-{pid}-state.ipc"
    prefix = shm.segment_prefix(pid)
    manager = ContentManagerConfig(
        upload_address=",".join(uploads), state_address=state_address,
        cloud_layers=split.n_layers - split.upload_layer, n_kv_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, hidden=c.hidden_size,
        capacity=config.capacity, budget_bytes=config.budget_mb << 20, idle_ttl=config.idle_ttl,
        claim_seconds=config.claim_seconds, watch_seconds=config.wait_seconds, segment_prefix=prefix,
        kv_dtype=str(loaded.model.dtype).removeprefix("torch."), keys=str(ring.directory) if ring else "",
        local_workers=(local_keys.public,) if local_keys else ())
    one_device = manager.layout(wire_itemsize=4).nbytes  # float32 rows, the larger wire dtype
    if manager.budget_bytes < one_device:
        raise UserError(f"--budget-mb {config.budget_mb} holds no device: one device's state at --capacity "
                        f"{config.capacity} takes {one_device / (1 << 20):.1f} MiB (float32 rows); give --budget-mb "
                        f"{-(-one_device >> 20)} or more, or a smaller --capacity")
    worker = wp.Config(str(loaded.path), loaded.identity, spec.dtype, split.exits, split.upload_layer,
                       connectable(state_address), config.heartbeat_ms, config.liveness)
    return _Plan(requests, uploads, state_address, prefix, split.describe(), manager, worker, worker_address, ring,
                 local_keys)


class _Children:
    """The content manager and the workers this broker started; dead ones are replaced, hung workers killed."""

    def __init__(self, config: BrokerConfig, plan: _Plan) -> None:
        from cecollm.cache.content_manager import serve_content_manager
        from cecollm.cloud.worker import WorkerConfig

        self.config = config
        self.plan = plan
        self.spawn = multiprocessing.get_context("spawn")
        self.per_worker = WorkerConfig(connectable(plan.worker_address), config.threads, verbose=config.verbose,
                                       client_keys=plan.local_keys)
        self.restarts = 0
        self.manager_restarts = 0
        self.failed: int | None = None  # the content manager's exit code, once it died for good
        self.waiter = ReadyWaiter()  # READY and FAILED of every child
        self._serve_manager = serve_content_manager
        self.manager = self._manager()
        self.manager.start()
        try:
            self.waiter.wait(self.manager.is_alive, MANAGER_START_SECONDS, "content manager")
        except CecollmError as exc:
            self.stop()
            raise UserError(str(exc)) from None
        self.workers = [self._worker(i) for i in range(config.workers)]
        for p in self.workers:
            p.start()

    def _manager(self):
        return self.spawn.Process(target=run_daemon, name="content-manager", args=(
            "content-manager", self._serve_manager, self.plan.manager, self.config.verbose, self.waiter.address))

    def _worker(self, index: int):
        from cecollm.cloud.worker import serve_worker

        return self.spawn.Process(target=run_daemon, name=f"worker-{index}", args=(
            "worker", serve_worker, self.per_worker, self.config.verbose, self.waiter.address))

    def tick(self, broker) -> None:
        """Between the broker's polls: children's news, killing hung workers, replacing dead ones and a dead
        content manager."""
        self._news()
        c = self.config
        for pid in broker.hung:
            if any(p.pid == pid and p.is_alive() for p in self.workers):
                log.warning("worker %d stopped answering: killed", pid)
                os.kill(pid, signal.SIGKILL)
        broker.hung.clear()
        for i, p in enumerate(self.workers):
            if p.exitcode is not None and self.restarts < c.workers * 10:
                # a worker of ours died (its request already went to another): start a new one
                self.restarts += 1
                broker.metrics.worker_restarts.inc()
                log.warning("worker %d exited (code %s); starting another", p.pid, p.exitcode)
                self.workers[i] = self._worker(i)
                self.workers[i].start()
        if not self.manager.is_alive():
            self._replace_manager(broker)

    def _replace_manager(self, broker) -> None:
        """The content manager died: every device's state went with it. A new one takes its addresses; edges
        hear that their session is unknown and upload again; parked requests go out again."""
        from cecollm.cache import shm

        code = self.manager.exitcode
        if self.manager_restarts >= MANAGER_RESTARTS:
            log.error("the content manager exited (code %s), %d times; shutting down", code, self.manager_restarts + 1)
            self.failed, broker.running = code, False
            return
        self.manager_restarts += 1
        broker.metrics.manager_lost(self.manager.pid)  # its counts stay in the metrics, its sessions do not
        broker.metrics.manager_restarts.inc()
        removed = shm.remove_leftovers(self.plan.segment_prefix)
        log.error("the content manager exited (code %s); starting another (%d device states lost, their edges "
                  "upload again)", code, len(removed))
        self.manager = self._manager()
        self.manager.start()
        broker.requeue_parked()

    def _news(self) -> None:
        import zmq

        while self.waiter.socket.poll(0):
            try:
                msg = launch.parse(self.waiter.socket.recv_multipart(zmq.NOBLOCK))
            except (zmq.Again, CecollmError):
                return
            if isinstance(msg, launch.Failed):
                log.error("%s %d could not start: %s", msg.role, msg.pid, msg.message)

    def stop(self) -> None:
        _stop_processes([*getattr(self, "workers", []), self.manager])
        self.waiter.close()


def _stop_processes(processes, grace: float = 5.0) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1)


def serve_broker(config: BrokerConfig, runtime) -> int:
    """The broker's main: serve metrics (--metrics), start the content manager and workers, route until told to
    stop, clean up."""
    from cecollm.broker.metrics import BrokerMetrics

    metrics = BrokerMetrics(budget_bytes=config.budget_mb << 20)
    exporter = metrics.serve(config.metrics) if config.metrics else None  # a bad address fails before the model loads
    try:
        return _serve(config, runtime, metrics, exporter)
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()


def _serve(config: BrokerConfig, runtime, metrics, exporter) -> int:
    import zmq

    from cecollm.broker.metrics import STATS_SECONDS
    from cecollm.broker.router import Broker
    from cecollm.cache import shm

    plan = _plan(config)
    context = zmq.Context()
    frontend, backend, state = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    for sock in (frontend, backend, state):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_BODY)  # requests, workers' answers, ARRIVED: fields only, no tensor
    ring = plan.ring
    auth = None
    if ring is not None:
        auth = ring.authenticator(context)
        ring.secure(frontend, DEVICES)
        ring.secure(backend, WORKERS)
        if plan.state_address.startswith("tcp://"):
            plan.local_keys.secure(state)
    state.connect(connectable(plan.state_address))  # parked requests: WATCH out, ARRIVED in
    broker = Broker(frontend, backend, plan.worker, config.max_queue, config.retries,
                    authorize=ring.may_act_for if ring else None, state=state, wait_seconds=config.wait_seconds,
                    job_seconds=config.job_seconds, max_per_device=config.max_per_device, max_batch=config.max_batch,
                    local_key=plan.local_keys.public if plan.local_keys else None, metrics=metrics)
    runtime.on_stop(lambda: setattr(broker, "running", False))
    children = None
    announced = False
    next_stats = 0.0
    metrics_url = _url(exporter.server_address) if exporter is not None else ""

    def tick(b) -> None:
        nonlocal announced, next_stats
        children.tick(b)
        runtime.run_reloads()
        if exporter is not None and time.monotonic() >= next_stats:  # the content manager's part of the metrics
            b.ask_stats()
            next_stats = time.monotonic() + STATS_SECONDS
        if not announced and b.ready_workers >= config.workers:
            announced = True
            _announce(config, plan, b.ready_workers, runtime, metrics_url)

    try:
        _bind(frontend, plan.requests, "request")
        _bind(backend, [plan.worker_address], "worker")
        children = _Children(config, plan)
        runtime.on_reload(lambda: _reload(ring, children))
        broker.serve(tick)
    finally:
        broker.shutdown()
        if children is not None:
            children.stop()
        frontend.close(0)
        state.close(0)
        backend.close()  # with the linger shutdown() set: hand-started workers hear the goodbye
        if auth is not None:
            auth.stop()
        context.term()
        leftovers = shm.remove_leftovers(plan.segment_prefix)
        if leftovers:
            log.warning("removed %d shared-memory segments left behind", len(leftovers))
        for address in [plan.state_address, *plan.requests, *plan.uploads, plan.worker_address]:
            if address.startswith("ipc://"):
                Path(address[len("ipc://"):]).unlink(missing_ok=True)
        log.info("broker stopped")
    if children.failed is not None:
        raise UserError(f"the content manager stopped (exit code {children.failed}); see the log above")
    return 0


def _reload(ring, children) -> None:
    """SIGHUP: the content manager's key lists (a signal of its own), and the broker's (a bad file raises:
    the caller logs it and the lists loaded before stay)."""
    if children.manager.is_alive():
        os.kill(children.manager.pid, signal.SIGHUP)
    if ring is not None:
        ring.reload()


def _url(address) -> str:
    """The metrics URL of the HTTP server's (host, port, ...)."""
    host, port = address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def _announce(config: BrokerConfig, plan: _Plan, ready: int, runtime, metrics_url: str) -> None:
    """The startup line for the person who started the broker, and READY for a launcher."""
    security = (f"keys {plan.ring.directory}" if plan.ring else
                "INSECURE: no keys, no encryption, anyone on this host can act as any device (loopback only)")
    metrics = f" | metrics {metrics_url}" if metrics_url else ""
    print(f"cecollm-broker: requests {','.join(plan.requests)} | uploads {','.join(plan.uploads)} | "
          f"workers {plan.worker_address} | state {plan.state_address} | model {config.model} "
          f"({plan.worker.identity[:12]}, {plan.worker.dtype}) | {plan.split_text} | {ready} workers | {security}{metrics}", flush=True)
    runtime.ready(requests=",".join(plan.requests), uploads=",".join(plan.uploads), workers=plan.worker_address,
                  state=plan.state_address, identity=plan.worker.identity, split=plan.split_text,
                  keys=str(plan.ring.directory) if plan.ring else "", metrics=metrics_url)
