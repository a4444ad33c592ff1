"""A cloud worker process: one thread serves the broker socket and computes.

The main thread connects, receives CONFIG, loads the model (mapped weights) and announces
READY, then serves: poll, dispatch on the command (a batch of REQUESTs is computed right there, no
hand-off to another thread, and each job answered), housekeeping (heartbeats, the broker's silence, mapped segments
no device uses any more). While a request computes, a small beat thread sends the heartbeats
instead; the two threads take turns on the socket under a lock (a full memory barrier, as
ZeroMQ asks of a socket that changes threads). When the broker is silent for `liveness` beats
the worker exits (the broker purges workers the same way, and hands a dead worker's request to
another). A remote worker (`remote`: another host than the broker's) gets device state as tensors from
the content manager at `state_address` instead of mapping its shared memory (see cloud/service.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from cecollm.errors import UserError
from cecollm.wire import broker_worker as wp
from cecollm.wire.dispatch import Dispatcher
from cecollm.wire.wire import MAX_BODY, Frames, ProtocolError
from cecollm.wire.worker_state import MAX_STATE_BYTES

log = logging.getLogger(__name__)

COMMIT_IDLE_MS = 2  # commits go to the content manager once no request came for this long (or see commits_due)
BATCH_WAIT_MS = 1000  # a batch's next REQUEST is on its way already (sent back to back); more is a broken broker


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs."""

    broker_address: str = "tcp://127.0.0.1:5557"  # the broker's worker socket
    threads: int = 1  # torch threads for compute
    connect_timeout: float = 30.0  # give up when the broker sends no CONFIG within this
    state_timeout: float = 0.0  # a content-manager call that takes longer goes back to the broker (parked);
    #                              0 = 2 s on this host (a lease never waits), 30 s remote (the state travels)
    verbose: bool = False  # debug logging
    remote: bool = False  # never map shared memory: the content manager sends the state (another host)
    state_address: str = ""  # the content manager's address; "" = the one the broker names (for remote: its host)
    model_dir: str = ""  # the model's transformers directory here; "" = the broker's path
    dtype: str = ""  # the compute dtype this worker expects; "" = the broker's (its CONFIG says), else must match it
    client_keys: object = None  # security.ClientKeys for the broker (and a tcp state) socket; None: --insecure


class Worker:
    def __init__(self, config: WorkerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.running = True
        self.exit_code = 0  # what serve() returns once the loop ends

    def stop(self) -> None:
        self.running = False

    def _connect(self) -> tuple[zmq.Socket, wp.Config]:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_BODY)  # CONFIG, REQUEST: fields and an edge's request, no tensor
        if self.config.client_keys is not None:
            self.config.client_keys.secure(sock)
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
        from cecollm.cloud.service import CloudService
        from cecollm.layers import DecoderRunner
        from cecollm.loading import LoadedModel
        from cecollm.packing import pack_linears
        from cecollm.split import Split
        from cecollm.weights import load_mapped
        from cecollm.wire.rpc import RpcSocket

        state_address = self.state_address(config)  # before the model loads: a wrong setup fails at once
        model_dir = Path(self.config.model_dir or config.model_dir)
        if not model_dir.is_dir():
            raise UserError(f"no model directory {model_dir} on this host (give --model)")
        if self.config.dtype and self.config.dtype != config.dtype:
            raise UserError(f"dtype mismatch: this worker computes in {self.config.dtype}, the broker serves {config.dtype}")
        model = load_mapped(model_dir, config.dtype)
        identity = LoadedModel(model, None, model_dir, str(model_dir)).identity
        if identity != config.identity:
            raise UserError(f"the model at {model_dir} here is {identity[:12]}, the broker serves "
                            f"{config.identity[:12]}")
        pack_linears(model)  # bfloat16: products on packed weights, as the edge's (the same bits)
        split = Split.create(model.config.num_hidden_layers, config.exits, config.upload_layer)
        keys = self.config.client_keys if state_address.startswith("tcp://") else None  # ipc: this host only
        largest = MAX_STATE_BYTES if self.config.remote else MAX_BODY  # a frame: a remote grant carries the state
        state = RpcSocket(self.context, state_address, keys=keys, max_reply_bytes=largest)
        timeout = self.config.state_timeout or (30.0 if self.config.remote else 2.0)
        return CloudService(DecoderRunner(model), split, identity, state, timeout, self.config.remote)

    def state_address(self, config: wp.Config) -> str:
        """Where the content manager is: as given, else as the broker names it (a remote worker: on the
        broker's host, which must then serve it over TCP)."""
        address = self.config.state_address or config.state_address
        if not self.config.remote or self.config.state_address:
            return address
        if not address.startswith("tcp://"):
            raise UserError(f"the broker's state socket is {address}, which another host cannot reach: start the "
                            "broker with --state-address tcp://*:PORT")
        host = self.config.broker_address[len("tcp://"):].rsplit(":", 1)[0]  # tcp://HOST:PORT -> HOST
        return f"tcp://{host}:{address.rsplit(':', 1)[1]}"

    def serve(self, on_ready=None) -> int:
        """Run until the broker goes away or a signal arrives; the exit code. `on_ready()` runs once the
        model is loaded (the runtime's READY for whoever started this worker)."""
        sock, config = self._connect()
        log.info("worker %d: loading %s", os.getpid(), config.model_dir)
        service = self._load(config)
        sock.send_multipart(wp.Ready().to_frames())
        if on_ready:
            on_ready()
        log.info("worker %d: ready (%s)", os.getpid(), "remote: state as tensors from " + service.state.address
                 if self.config.remote else "state in shared memory")
        beats = BeatThread(sock, config.heartbeat_ms / 1000)
        try:
            return self._serve_loop(sock, beats, service, config)
        finally:
            beats.stop()
            service.close()
            sock.close(0)

    def _serve_loop(self, sock: zmq.Socket, beats: BeatThread, service, config: wp.Config) -> int:
        interval = config.heartbeat_ms / 1000
        broker_seen = next_beat = time.monotonic()
        handlers = Dispatcher({wp.Request: self.on_request, wp.Heartbeat: lambda *_: None,
                               wp.Disconnect: self.on_disconnect})
        while self.running:
            wait_ms = COMMIT_IDLE_MS if service.commits else max(1, int(interval * 1000))
            with beats.lock:
                frames = sock.recv_multipart(copy=False) if sock.poll(wait_ms) else None
            now = time.monotonic()
            if service.commits and (frames is None or service.commits_due(now)):
                service.send_commits()  # the worker is idle (or they have waited long enough)
            if frames is not None:
                broker_seen = now
                try:
                    handlers(wp.parse(frames, handlers.commands), sock, beats, service)
                except ProtocolError as exc:
                    log.warning("broker message refused: %s", exc)
            if now >= next_beat:
                with beats.lock:
                    sock.send_multipart(wp.Heartbeat().to_frames())
                next_beat = now + interval
                service.sweep()
            if now - broker_seen > interval * config.liveness:
                log.warning("worker %d: the broker is silent; exiting", os.getpid())
                self.exit_code = 1
                break
        return self.exit_code

    def on_request(self, msg: wp.Request, sock: zmq.Socket, beats: BeatThread, service) -> None:
        """A batch: this REQUEST and the `left` ones the broker sent right behind it, computed together."""
        batch = [msg]
        with beats.lock:
            while batch[-1].left and sock.poll(BATCH_WAIT_MS):
                try:
                    nxt = wp.parse(sock.recv_multipart(copy=False), (wp.Command.REQUEST,))
                except ProtocolError as exc:
                    log.warning("broker message refused in a batch: %s", exc)
                    break
                batch.append(nxt)
        with beats.computing():
            payloads = service.handle_batch([m.payload for m in batch])
        answers = [wp.Defer(m.job) if frames is None else wp.Reply(m.job, Frames(frames))
                   for m, frames in zip(batch, payloads)]
        with beats.lock:
            for answer in answers:
                sock.send_multipart(answer.to_frames(), copy=False)

    def on_disconnect(self, msg: wp.Disconnect, *_) -> None:
        log.info("worker %d: the broker said goodbye", os.getpid())
        self.running = False


class BeatThread:
    """Sends the worker's heartbeats while its main thread computes a request."""

    def __init__(self, sock: zmq.Socket, interval: float) -> None:
        self.sock = sock
        self.interval = interval
        self.lock = threading.Lock()  # whoever holds it may use the socket
        self._busy = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def computing(self):
        self._busy.set()
        try:
            yield
        finally:
            self._busy.clear()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            if self._busy.is_set():
                with self.lock:
                    self.sock.send_multipart(wp.Heartbeat().to_frames())

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=self.interval + 5)


def serve_worker(config: WorkerConfig, runtime) -> int:
    """A worker's main (the broker starts workers through the process runtime; `cecollm-worker` too).
    Its READY goes to the broker over the worker protocol, once the model is loaded."""
    import torch

    torch.set_num_threads(config.threads)
    worker = Worker(config)
    runtime.on_stop(worker.stop)
    return worker.serve(runtime.ready)
