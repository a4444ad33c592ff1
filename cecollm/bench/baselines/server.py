"""The stateless baseline cloud: what the broker does not provide, for the benchmark's baselines.

- GENERATE: the cloud-based deployment; the whole model runs here (SplitEngine, mode cloud).
- DECIDE_FULL: the cloud keeps nothing between requests; it runs its layers (upload layer to the
  end) over every row the edge sent, with a fresh KV cache, and returns the token after the last
  row. The naive cloud-edge baseline and the "without content manager and parallel upload"
  ablation use it.

Run as `python -m cecollm.bench.baselines.server --address tcp://127.0.0.1:PORT --model ...` (through
the process runtime: READY to its launcher once it serves; SIGTERM/SIGINT stop it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import click

from cecollm.bench.baselines import protocol as bp
from cecollm.cliutil import GuardedCommand
from cecollm.config import DEFAULT_MODEL
from cecollm.dtypes import from_numpy
from cecollm.errors import UserError
from cecollm.wire.dispatch import Dispatcher
from cecollm.wire.security import DEVICES, KeyRing
from cecollm.wire.wire import ErrorCode, ProtocolError, clip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineServerConfig:
    """How the baseline cloud runs; the click options take their defaults from here."""

    address: str = "tcp://127.0.0.1:5565"  # ROUTER address to bind
    model: str = DEFAULT_MODEL  # a transformers directory, a .gguf file, or the default model's name
    exits: str = ""  # exits "8,15"; "" = the model's default split (must match the edge's)
    upload_layer: int = 0  # 0 = the last exit
    heads: str = ""  # heads file whose exits define the split
    threads: int = 1  # torch threads
    poll_ms: int = 200  # how often the serving loop looks at its stop flag
    keys: str = ""  # a keys directory (`cecollm keys`): CURVE with its device keys, as the broker; "" = none
    verbose: bool = False  # debug logging


class StatelessCloud:
    """Answers one request at a time from the model alone; holds no per-device state."""

    def __init__(self, model, split) -> None:
        from cecollm.edge.heads import HeadSet
        from cecollm.engine import SplitEngine
        from cecollm.layers import DecoderRunner

        self.split = split
        self.engine = SplitEngine(model, split, HeadSet.lens(model, split.exits))  # heads unused in mode cloud
        self.runner = DecoderRunner(model)
        self.max_positions = getattr(model.config, "max_position_embeddings", 1 << 16)
        self.requests = Dispatcher({bp.Generate: self._generate, bp.DecideFull: self._decide_full})

    def handle(self, frames) -> object:
        """The reply (a protocol message) to one request's frames."""
        try:
            msg = bp.parse(frames, self.requests.commands)
        except ProtocolError as exc:
            log.warning("request refused: %s", exc)
            return bp.Error(0, ErrorCode.MALFORMED, clip(str(exc)))
        try:
            return self.requests(msg)
        except ProtocolError as exc:
            log.warning("request %d refused: %s", msg.seq, exc)
            return bp.Error(msg.seq, ErrorCode.MALFORMED, clip(str(exc)))
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("request %d failed", msg.seq)
            return bp.Error(msg.seq, ErrorCode.INTERNAL, clip(f"{type(exc).__name__}: {exc}"))

    def _generate(self, msg):
        from cecollm.config import GenerationConfig

        vocab = self.runner.embed.num_embeddings
        if max(msg.prompt_ids) >= vocab:
            raise ProtocolError(f"GENERATE: token id {max(msg.prompt_ids)} outside the vocabulary ({vocab})")
        if len(msg.prompt_ids) + msg.max_new_tokens > self.max_positions:
            raise ProtocolError(f"GENERATE: {len(msg.prompt_ids)} + {msg.max_new_tokens} positions exceed "
                                f"the model's {self.max_positions}")
        t0 = time.perf_counter()
        result = self.engine.generate(list(msg.prompt_ids), GenerationConfig(mode="cloud",
                                                                             max_new_tokens=msg.max_new_tokens))
        return bp.Response(msg.seq, tuple(result.token_ids), time.perf_counter() - t0)

    def _decide_full(self, msg):
        import torch

        from cecollm.cache.kv import KVCache
        from cecollm.layers import top1

        n, hidden = msg.rows.shape
        if hidden != self.runner.hidden_size:
            raise ProtocolError(f"DECIDE_FULL: rows of width {hidden}, the model's hidden size is "
                                f"{self.runner.hidden_size}")
        if n > self.max_positions:
            raise ProtocolError(f"DECIDE_FULL: {n} rows exceed the model's {self.max_positions} positions")
        t0 = time.perf_counter()
        with torch.inference_mode():
            dtype = self.runner.embed.weight.dtype
            x = from_numpy(msg.rows.copy()).to(dtype).unsqueeze(0)  # [n, H] -> [1, n, H]
            first = self.split.upload_layer
            cache = KVCache.for_runner(self.runner, first, self.split.n_layers - first, capacity=n)
            rope = self.runner.rope(0, n, x)
            for index in range(first, self.split.n_layers):
                x = self.runner.run_layer(index, x, 0, cache, rope)
            token, prob = top1(self.runner.logits(x[:, -1:])[0, -1])
        return bp.Token(msg.seq, token, prob, time.perf_counter() - t0)


def serve(socket, cloud: StatelessCloud, running: Callable[[], bool], poll_ms: int = 200) -> int:
    """Answer requests on a bound ROUTER `socket` until `running()` is false; the number answered."""
    import zmq

    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    answered = 0
    while running():
        if not poller.poll(poll_ms):
            continue
        frames = socket.recv_multipart(copy=False)
        # [peer identity, b"" delimiter, *message]
        if len(frames) < 3 or len(frames[1].buffer) != 0:
            log.warning("dropped a message without the REQ-style envelope (%d frames)", len(frames))
            continue
        reply = cloud.handle(frames[2:])
        socket.send_multipart([frames[0], b"", *reply.to_frames()], copy=False)
        answered += 1
    return answered


def serve_baseline(config: BaselineServerConfig, runtime) -> int:
    """The baseline cloud's main (through the process runtime): load, bind, READY, serve until told to stop."""
    import torch
    import zmq

    from cecollm.spec import ModelSpec

    torch.set_num_threads(config.threads)
    spec = ModelSpec.from_options(config.model, config.exits, config.upload_layer, config.heads)
    loaded = spec.load()
    cloud = StatelessCloud(loaded.model, spec.resolve(loaded).split)
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    auth = None
    if config.keys:  # the baselines pay for encryption as CE-CoLLM does
        ring = KeyRing(config.keys)
        auth = ring.authenticator(context)
        ring.secure(sock, DEVICES)
    try:
        try:
            sock.bind(config.address)
        except zmq.ZMQError as exc:
            raise UserError(f"cannot bind {config.address}: {exc}") from None
        log.info("baseline cloud: %s | model %s (%s) | %s", config.address, config.model, loaded.identity[:12],
                 cloud.split.describe())
        runtime.ready(address=config.address, identity=loaded.identity)
        answered = serve(sock, cloud, lambda: runtime.running, config.poll_ms)
        log.info("baseline cloud stopped after %d requests", answered)
    finally:
        sock.close(0)
        if auth is not None:
            auth.stop()
        context.term()
    return 0


_D = BaselineServerConfig()


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--address", default=_D.address, show_default=True, help="ROUTER address to bind.")
@click.option("--model", default=_D.model, show_default=True, help="A transformers directory, a .gguf file, "
              "or the default model's name.")
@click.option("--exits", default=_D.exits, help="Exits, e.g. 8,15 [default: the model's default split].")
@click.option("--upload-layer", type=int, default=_D.upload_layer, help="Layer whose output the edge sends "
              "[default: the last exit].")
@click.option("--heads", default=_D.heads, help="Heads file whose exits define the split.")
@click.option("--threads", type=int, default=_D.threads, show_default=True, help="Torch threads.")
@click.option("--keys", default=_D.keys, help="A keys directory (`cecollm keys`): speak CURVE with its device keys.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def baseline_command(**options) -> None:
    """The stateless cloud of the benchmark's baselines (cloud-based and naive cloud-edge)."""
    import sys

    from cecollm.runtime import run_daemon

    config = BaselineServerConfig(**options)
    sys.exit(run_daemon("baseline-cloud", serve_baseline, config, config.verbose))


if __name__ == "__main__":
    baseline_command(prog_name="python -m cecollm.bench.baselines.server")
