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
from cecollm.loading import DEFAULT_MODEL

log = logging.getLogger("cecollm.broker")


@dataclass(frozen=True)
class BrokerConfig:
    """How the broker daemon runs; the click options take their defaults from here."""

    request_address: str = "tcp://*:5555"  # edges' requests (ROUTER, bound here); commas bind several
    upload_address: str = "tcp://*:5556"  # edges' uploads (PULL, bound by the content manager); commas too
    worker_address: str = "tcp://127.0.0.1:5557"  # workers connect here (ROUTER, bound here)
    state_address: str = ""  # the content manager's control socket; "" = ipc:// in the temp dir
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


def run_broker(config: BrokerConfig) -> None:
    """Start the content manager and workers, route until a signal, clean everything up."""
    import zmq

    from cecollm.broker import shm
    from cecollm.broker import worker_protocol as wp
    from cecollm.broker.broker import Broker
    from cecollm.broker.content_manager import ContentManagerConfig, run_content_manager
    from cecollm.broker.weights import load_mapped
    from cecollm.broker.worker import WorkerConfig, run_worker
    from cecollm.defaults import choose_split
    from cecollm.loading import LoadedModel, resolve_model_dir
    from cecollm.split import parse_exits

    requests, uploads = _endpoints(config.request_address), _endpoints(config.upload_address)
    for name, value, low in (("--workers", config.workers, 0), ("--capacity", config.capacity, 1),
                             ("--budget-mb", config.budget_mb, 1), ("--heartbeat-ms", config.heartbeat_ms, 10),
                             ("--liveness", config.liveness, 1), ("--threads", config.threads, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if config.idle_ttl <= 0 or config.wait_seconds <= 0:
        raise UserError("--idle-ttl and --wait-seconds must be positive")
    model_dir = resolve_model_dir(config.model)
    model = load_mapped(model_dir)
    loaded = LoadedModel(model, None, model_dir, config.model)
    split, _ = choose_split(loaded, parse_exits(config.exits) if config.exits else None,
                            config.upload_layer or None, config.heads or None)
    c = model.config
    pid = os.getpid()
    state_address = config.state_address or f"ipc://{tempfile.gettempdir()}/cecollm-{pid}-state.ipc"
    prefix = shm.segment_prefix(pid)
    cm_config = ContentManagerConfig(
        upload_address=",".join(uploads), state_address=state_address,
        cloud_layers=split.n_layers - split.upload_layer, n_kv_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, hidden=c.hidden_size,
        capacity=config.capacity, budget_bytes=config.budget_mb << 20, idle_ttl=config.idle_ttl,
        wait_seconds=config.wait_seconds, segment_prefix=prefix)
    worker_config = wp.Config(str(model_dir), loaded.identity, split.exits, split.upload_layer, state_address,
                              config.heartbeat_ms, config.liveness)
    del model, loaded

    context = zmq.Context()
    frontend, backend = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
    for sock in (frontend, backend):
        sock.setsockopt(zmq.LINGER, 0)
    _bind(frontend, requests, "request")
    _bind(backend, [config.worker_address], "worker")
    spawn = multiprocessing.get_context("spawn")
    manager = spawn.Process(target=run_content_manager, args=(cm_config, config.verbose), name="content-manager")
    manager.start()
    per_worker = WorkerConfig(_connectable(config.worker_address), config.threads, verbose=config.verbose)
    children = [spawn.Process(target=run_worker, args=(per_worker,), name=f"worker-{i}") for i in range(config.workers)]
    for p in children:
        p.start()
    broker = Broker(frontend, backend, worker_config, config.max_queue, config.retries)
    announced, failed, restarts = [], [], [0]

    def stop(signum, frame):
        broker.running = False

    def tick(b: Broker) -> None:
        if not announced and b.ready_workers >= config.workers:
            announced.append(True)
            print(f"cecollm-broker: requests {','.join(requests)} | uploads {','.join(uploads)} | "
                  f"workers {config.worker_address} | model {config.model} ({worker_config.identity[:12]}) | "
                  f"{split.describe()} | {b.ready_workers} workers", flush=True)
        for i, p in enumerate(children):
            if p.exitcode is not None and restarts[0] < config.workers * 10:
                # a worker of ours died (its request already went to another): start a new one
                restarts[0] += 1
                log.warning("worker %d exited (code %s); starting another", p.pid, p.exitcode)
                children[i] = spawn.Process(target=run_worker, args=(per_worker,), name=f"worker-{i}")
                children[i].start()
        if not manager.is_alive():
            log.error("the content manager exited (code %s); shutting down", manager.exitcode)
            failed.append(manager.exitcode)
            b.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        broker.serve(tick)
    finally:
        broker.shutdown()
        _stop_processes([*children, manager])
        frontend.close(0)
        backend.close()  # with the linger shutdown() set: hand-started workers hear the goodbye
        context.term()
        leftovers = shm.remove_leftovers(prefix)
        if leftovers:
            log.warning("removed %d shared-memory segments left behind", len(leftovers))
        for address in [state_address, *requests, *uploads, config.worker_address]:
            if address.startswith("ipc://"):
                Path(address[len("ipc://"):]).unlink(missing_ok=True)
        log.info("broker stopped")
    if failed:
        raise UserError(f"the content manager stopped (exit code {failed[0]}); see the log above")


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
              help="Where workers connect (ROUTER); give it to `cecollm-worker --broker`.")
@click.option("--state-address", default=_B.state_address, help="The content manager's control socket "
              "[default: ipc:// in the temp directory].")
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
              help="The broker's workers address, e.g. tcp://127.0.0.1:5557 (same host: state is in shared memory).")
@click.option("--threads", type=int, default=_B.threads, show_default=True, help="Torch threads.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def worker_command(broker_address: str, threads: int, verbose: bool) -> None:
    """Start one more cloud worker for a running broker on this host."""
    from cecollm.broker.worker import WorkerConfig, run_worker

    sys.exit(run_worker(WorkerConfig(broker_address, threads, verbose=verbose)))


def main() -> None:
    broker_command(prog_name="cecollm-broker")


def worker_main() -> None:
    worker_command(prog_name="cecollm-worker")
