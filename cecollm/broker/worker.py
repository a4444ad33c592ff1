"""A cloud worker process: an I/O thread that talks to the broker and a compute thread.

The main thread owns the broker socket: it connects, receives CONFIG, loads the model (mapped
weights) and announces READY, then forwards REQUESTs to the compute thread over an inproc
pair and REPLYs back, and keeps heartbeating both ways even while a request computes. When
the broker is silent for `liveness` beats the worker exits (the broker purges workers the
same way, and hands a dead worker's request to another).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from cecollm.broker import worker_protocol as wp
from cecollm.broker.wire import ProtocolError
from cecollm.errors import UserError

log = logging.getLogger(__name__)

COMPUTE = "inproc://compute"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs."""

    broker_address: str = "tcp://127.0.0.1:5557"  # the broker's worker socket
    threads: int = 1  # torch threads for compute
    connect_timeout: float = 30.0  # give up when the broker sends no CONFIG within this
    state_timeout: float = 10.0  # a content-manager call that takes longer fails the request
    verbose: bool = False  # debug logging


class Worker:
    def __init__(self, config: WorkerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.running = True

    def _connect(self) -> tuple[zmq.Socket, wp.Config]:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.config.broker_address)
        sock.send_multipart(wp.Connect(os.getpid()).to_frames())
        deadline = time.monotonic() + self.config.connect_timeout
        while self.running and time.monotonic() < deadline:
            if sock.poll(200):
                try:
                    msg = wp.parse(sock.recv_multipart(copy=False))
                except ProtocolError as exc:
                    log.warning("broker message refused: %s", exc)
                    continue
                if isinstance(msg, wp.Config):
                    return sock, msg
        sock.close(0)
        raise UserError(f"no configuration from the broker at {self.config.broker_address} "
                        f"within {self.config.connect_timeout:g} s")

    def _load(self, config: wp.Config):
        from cecollm.broker.rpc import RpcSocket
        from cecollm.broker.weights import load_mapped
        from cecollm.cloud.service import CloudService
        from cecollm.layers import DecoderRunner
        from cecollm.loading import LoadedModel
        from cecollm.split import Split

        model = load_mapped(Path(config.model_dir))
        identity = LoadedModel(model, None, Path(config.model_dir), config.model_dir).identity
        if identity != config.identity:
            raise UserError(f"the model at {config.model_dir} here is {identity[:12]}, the broker serves "
                            f"{config.identity[:12]}")
        split = Split.create(model.config.num_hidden_layers, config.exits, config.upload_layer)
        state = RpcSocket(self.context, config.state_address)
        return CloudService(DecoderRunner(model), split, identity, state, self.config.state_timeout)

    def _compute_loop(self, service) -> None:
        pair = self.context.socket(zmq.PAIR)
        pair.connect(COMPUTE)
        try:
            while True:
                frames = pair.recv_multipart(copy=False)
                if not frames or len(frames[0].buffer) == 0:
                    return  # the I/O thread says stop
                pair.send_multipart([frames[0], *service.handle(frames[1:])], copy=False)
        finally:
            pair.close(0)
            service.state.close()

    def serve(self) -> int:
        """Run until the broker goes away or a signal arrives; the exit code."""
        sock, config = self._connect()
        log.info("worker %d: loading %s", os.getpid(), config.model_dir)
        service = self._load(config)
        pair = self.context.socket(zmq.PAIR)
        pair.bind(COMPUTE)
        compute = threading.Thread(target=self._compute_loop, args=(service,), name="compute", daemon=True)
        compute.start()
        sock.send_multipart(wp.Ready().to_frames())
        log.info("worker %d: ready", os.getpid())
        code = self._io_loop(sock, pair, config)
        pair.send(b"")
        compute.join(timeout=5)
        pair.close(0)
        sock.close(0)
        return code

    def _io_loop(self, sock: zmq.Socket, pair: zmq.Socket, config: wp.Config) -> int:
        interval = config.heartbeat_ms / 1000
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        broker_seen = next_beat = time.monotonic()
        while self.running:
            ready = dict(poller.poll(max(1, int(interval * 1000))))
            now = time.monotonic()
            if sock in ready:
                frames = sock.recv_multipart(copy=False)
                broker_seen = now
                try:
                    msg = wp.parse(frames, (wp.Command.REQUEST, wp.Command.HEARTBEAT, wp.Command.DISCONNECT))
                except ProtocolError as exc:
                    log.warning("broker message refused: %s", exc)
                    msg = None
                if isinstance(msg, wp.Request):
                    pair.send_multipart([msg.job.to_bytes(8, "big"), *msg.payload], copy=False)
                elif isinstance(msg, wp.Disconnect):
                    log.info("worker %d: the broker said goodbye", os.getpid())
                    return 0
            if pair in ready:
                job, *payload = pair.recv_multipart(copy=False)
                sock.send_multipart(wp.Reply(int.from_bytes(job.bytes, "big"), tuple(payload)).to_frames(), copy=False)
            if now >= next_beat:
                sock.send_multipart(wp.Heartbeat().to_frames())
                next_beat = now + interval
            if now - broker_seen > interval * config.liveness:
                log.warning("worker %d: the broker is silent; exiting", os.getpid())
                return 1
        return 0


def run_worker(config: WorkerConfig) -> int:
    """Process entry point (the broker starts workers with it; `cecollm-worker` too)."""
    import logging as _logging
    import sys

    _logging.basicConfig(level=_logging.DEBUG if config.verbose else _logging.INFO, stream=sys.stderr,
                         format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(config.threads)
    worker = Worker(config)

    def stop(signum, frame):
        worker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return worker.serve()
    except UserError as exc:
        log.error("worker %d: %s", os.getpid(), exc)
        return 2
