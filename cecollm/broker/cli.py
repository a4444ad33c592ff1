"""`cecollm-broker` (the cloud daemon) and `cecollm-worker` (more workers, by hand)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from cecollm.cliutil import GuardedCommand
from cecollm.errors import UserError
from cecollm.config import DEFAULT_MODEL

log = logging.getLogger("cecollm.broker")


@dataclass(frozen=True)
class BrokerConfig:
    """How the broker daemon runs; the click options take their defaults from here."""

    request_address: str = "tcp://*:5555"  # edges' requests (ROUTER, bound here); commas bind several
    upload_address: str = "tcp://*:5556"  # edges' uploads (PULL, bound by the content manager); commas too
    worker_address: str = "tcp://127.0.0.1:5557"  # workers connect here (ROUTER, bound here)
    state_address: str = ""  # the content manager's control socket; "" = ipc:// in the temp dir (tcp://*:PORT for
    #                           workers on other hosts)
    model: str = DEFAULT_MODEL  # a transformers directory, a .gguf file, or the default model's name
    exits: str = ""  # exits as layer counts, "8,15"; "" = the model's default split
    upload_layer: int = 0  # layer whose output the edges upload; 0 = the last exit
    heads: str = ""  # heads file whose exits define the split (the cloud never runs heads)
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
    verbose: bool = False  # debug logging


_B = BrokerConfig()


def _endpoints(text: str) -> list[str]:
    found = [e.strip() for e in text.split(",") if e.strip()]
    if not found:
        raise UserError("an address is empty")
    for e in found:
        if not e.startswith(("tcp://", "ipc://")):
            raise UserError(f"address {e!r} must start with tcp:// or ipc://")
    return found


def _connectable(address: str) -> str:
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
    worker: object  # worker_protocol.Config, sent to every worker that connects


def _check(config: BrokerConfig) -> None:
    for name, value, low in (("--workers", config.workers, 0), ("--capacity", config.capacity, 1),
                             ("--budget-mb", config.budget_mb, 1), ("--heartbeat-ms", config.heartbeat_ms, 10),
                             ("--liveness", config.liveness, 1), ("--threads", config.threads, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if config.idle_ttl <= 0 or config.wait_seconds <= 0:
        raise UserError("--idle-ttl and --wait-seconds must be positive")


def _plan(config: BrokerConfig) -> _Plan:
    """Check the options, load the model (mapped) once for its identity and split."""
    from cecollm.broker import shm
    from cecollm.broker import worker_protocol as wp
    from cecollm.broker.content_manager import ContentManagerConfig
    from cecollm.broker.weights import load_mapped
    from cecollm.defaults import choose_split
    from cecollm.loading import LoadedModel, resolve_model_dir
    from cecollm.split import parse_exits

    requests, uploads = _endpoints(config.request_address), _endpoints(config.upload_address)
    for address in (config.worker_address, config.state_address or "ipc://"):
        if len(_endpoints(address)) != 1:
            raise UserError(f"address {address!r}: one endpoint only")
    _check(config)
    model_dir = resolve_model_dir(config.model)
    model = load_mapped(model_dir)
    loaded = LoadedModel(model, None, model_dir, config.model)
    split, _ = choose_split(loaded, parse_exits(config.exits) if config.exits else None,
                            config.upload_layer or None, config.heads or None)
    c = model.config
    pid = os.getpid()
    state_address = config.state_address or f"ipc://{tempfile.gettempdir()}/cecollm-{pid}-state.ipc"
    prefix = shm.segment_prefix(pid)
    manager = ContentManagerConfig(
        upload_address=",".join(uploads), state_address=state_address,
        cloud_layers=split.n_layers - split.upload_layer, n_kv_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, hidden=c.hidden_size,
        capacity=config.capacity, budget_bytes=config.budget_mb << 20, idle_ttl=config.idle_ttl,
        wait_seconds=config.wait_seconds, segment_prefix=prefix, kv_dtype=str(model.dtype).removeprefix("torch."))
    worker = wp.Config(str(model_dir), loaded.identity, split.exits, split.upload_layer, _connectable(state_address),
                       config.heartbeat_ms, config.liveness)
    return _Plan(requests, uploads, state_address, prefix, split.describe(), manager, worker)


class _Children:
    """The content manager and the workers this broker started; dead workers are replaced."""

    def __init__(self, config: BrokerConfig, plan: _Plan) -> None:
        from cecollm.broker.content_manager import run_content_manager
        from cecollm.broker.worker import WorkerConfig

        self.config = config
        self.plan = plan
        self.spawn = multiprocessing.get_context("spawn")
        self.per_worker = WorkerConfig(_connectable(config.worker_address), config.threads, verbose=config.verbose)
        self.restarts = 0
        self.announced = False
        self.failed: int | None = None  # the content manager's exit code, once it died
        self.manager = self.spawn.Process(target=run_content_manager, args=(plan.manager, config.verbose),
                                          name="content-manager")
        self.workers = [self._worker(i) for i in range(config.workers)]
        self.manager.start()
        for p in self.workers:
            p.start()

    def _worker(self, index: int):
        from cecollm.broker.worker import run_worker

        return self.spawn.Process(target=run_worker, args=(self.per_worker,), name=f"worker-{index}")

    def tick(self, broker) -> None:
        """Between the broker's polls: the startup line, replacing dead workers, a dead manager."""
        c, plan = self.config, self.plan
        if not self.announced and broker.ready_workers >= c.workers:
            self.announced = True
            print(f"cecollm-broker: requests {','.join(plan.requests)} | uploads {','.join(plan.uploads)} | "
                  f"workers {c.worker_address} | state {plan.state_address} | model {c.model} ({plan.worker.identity[:12]}) | "
                  f"{plan.split_text} | {broker.ready_workers} workers", flush=True)
        for i, p in enumerate(self.workers):
            if p.exitcode is not None and self.restarts < c.workers * 10:
                # a worker of ours died (its request already went to another): start a new one
                self.restarts += 1
                log.warning("worker %d exited (code %s); starting another", p.pid, p.exitcode)
                self.workers[i] = self._worker(i)
                self.workers[i].start()
        if not self.manager.is_alive():
            log.error("the content manager exited (code %s); shutting down", self.manager.exitcode)
            self.failed = self.manager.exitcode
            broker.running = False

    def stop(self) -> None:
        _stop_processes([*self.workers, self.manager])


def run_broker(config: BrokerConfig) -> None:
    """Start the content manager and workers, route until a signal, clean everything up."""
    import zmq

    from cecollm.broker import shm
    from cecollm.broker.broker import Broker

    plan = _plan(config)
    context = zmq.Context()
    frontend, backend = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
    for sock in (frontend, backend):
        sock.setsockopt(zmq.LINGER, 0)
    broker = Broker(frontend, backend, plan.worker, config.max_queue, config.retries)

    def stop(signum, frame):
        broker.running = False

    signal.signal(signal.SIGTERM, stop)  # before any child starts: a signal never skips the cleanup
    signal.signal(signal.SIGINT, stop)
    children = None
    try:
        _bind(frontend, plan.requests, "request")
        _bind(backend, [config.worker_address], "worker")
        children = _Children(config, plan)
        broker.serve(children.tick)
    finally:
        broker.shutdown()
        if children is not None:
            children.stop()
        frontend.close(0)
        backend.close()  # with the linger shutdown() set: hand-started workers hear the goodbye
        context.term()
        leftovers = shm.remove_leftovers(plan.segment_prefix)
        if leftovers:
            log.warning("removed %d shared-memory segments left behind", len(leftovers))
        for address in [plan.state_address, *plan.requests, *plan.uploads, config.worker_address]:
            if address.startswith("ipc://"):
                Path(address[len("ipc://"):]).unlink(missing_ok=True)
        log.info("broker stopped")
    if children.failed is not None:
        raise UserError(f"the content manager stopped (exit code {children.failed}); see the log above")


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


_ctx = {"help_option_names": ["-h", "--help"]}


@click.command(cls=GuardedCommand, context_settings=_ctx)
@click.option("--requests", "request_address", default=_B.request_address, show_default=True,
              help="Where edges send requests (ROUTER); several endpoints separated by commas.")
@click.option("--uploads", "upload_address", default=_B.upload_address, show_default=True,
              help="Where edges push hidden states (PULL); several endpoints separated by commas.")
@click.option("--workers-address", "worker_address", default=_B.worker_address, show_default=True,
              help="Where workers connect (ROUTER); give it to `cecollm-worker --broker`. tcp://*:PORT lets "
              "workers on other hosts connect.")
@click.option("--state-address", default=_B.state_address, help="The content manager's control socket "
              "[default: ipc:// in the temp directory]; tcp://*:PORT for remote workers (cecollm-worker --remote).")
@click.option("--model", default=_B.model, show_default=True, help="A transformers directory, a .gguf file, "
              "or the default model's name.")
@click.option("--exits", default=_B.exits, help="Exits, e.g. 8,15 [default: the model's default split]; "
              "edges must use the same.")
@click.option("--upload-layer", type=int, default=_B.upload_layer, help="Layer whose output edges upload "
              "[default: the last exit].")
@click.option("--heads", default=_B.heads, help="Heads file whose exits define the split.")
@click.option("--workers", type=int, default=_B.workers, show_default=True, help="Worker processes to start.")
@click.option("--heartbeat-ms", type=int, default=_B.heartbeat_ms, show_default=True)
@click.option("--liveness", type=int, default=_B.liveness, show_default=True,
              help="Heartbeats a worker may miss before it is purged.")
@click.option("--capacity", type=int, default=_B.capacity, show_default=True, help="Positions per device.")
@click.option("--budget-mb", type=int, default=_B.budget_mb, show_default=True,
              help="Shared memory for all devices' state; idle devices are evicted (LRU) past it.")
@click.option("--idle-ttl", type=float, default=_B.idle_ttl, show_default=True,
              help="Seconds before an idle device's state is released.")
@click.option("--wait-seconds", type=float, default=_B.wait_seconds, show_default=True,
              help="How long a request waits for hidden states still in flight.")
@click.option("--threads", type=int, default=_B.threads, show_default=True, help="Torch threads per worker.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def broker_command(**options) -> None:
    """Serve the cloud partition: a broker, a content manager holding every device's state in
    shared memory, and --workers worker processes. Ctrl-C (or SIGTERM) stops everything."""
    from cecollm.cliutil import setup_logging

    setup_logging(options["verbose"])
    run_broker(BrokerConfig(**options))


@click.command(cls=GuardedCommand, context_settings=_ctx)
@click.option("--broker", "broker_address", required=True,
              help="The broker's workers address, e.g. tcp://127.0.0.1:5557.")
@click.option("--remote", is_flag=True, help="Another host than the broker's: never map its shared memory, get "
              "each device's state as tensors from the content manager (the broker needs --state-address tcp://*:PORT).")
@click.option("--state", "state_address", default="", help="The content manager's address, e.g. tcp://HOST:PORT "
              "[default: as the broker names it; with --remote, on the --broker host].")
@click.option("--model", "model_dir", default="", help="The model's transformers directory on this host "
              "[default: the broker's path].")
@click.option("--threads", type=int, default=_B.threads, show_default=True, help="Torch threads.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def worker_command(broker_address: str, remote: bool, state_address: str, model_dir: str, threads: int,
                   verbose: bool) -> None:
    """Start one more cloud worker for a running broker: on its host (device state in shared memory), or with
    --remote on another host (device state sent over TCP per request)."""
    from cecollm.broker.worker import WorkerConfig, run_worker

    for address in (broker_address, state_address):
        if address and (len(_endpoints(address)) != 1 or (remote and not address.startswith("tcp://"))):
            raise UserError(f"address {address!r}: one tcp:// endpoint" + (" (--remote)" if remote else ""))
    sys.exit(run_worker(WorkerConfig(broker_address, threads, verbose=verbose, remote=remote,
                                     state_address=state_address, model_dir=model_dir)))


def main() -> None:
    broker_command(prog_name="cecollm-broker")


def worker_main() -> None:
    worker_command(prog_name="cecollm-worker")
