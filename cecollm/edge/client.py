"""The edge device as a client of the cloud broker, usable from Python (the CLI wraps it).

Each generation opens a session (HELLO), runs the edge partition step by step, hands every
upload-layer row to the background sender, and asks the cloud (DECIDE, no tensor) only when
no exit is confident. A request that gets no answer within `timeout` is decided at the last
exit instead, counted, and the generation goes on; after `max_timeouts` in a row, or when the
cloud lost the device's state and a re-upload does not help, the rest of the generation is
decided on the edge alone and the result says so. A cloud that serves another model or split
refuses the session: that is the user's mistake, raised as a UserError, not papered over.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zmq

from cecollm.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_THRESHOLD, DEFAULT_WAIT_BELOW
from cecollm.dtypes import name_of, to_numpy, torch_dtype, wire_dtype
from cecollm.edge.exact import ExactRun
from cecollm.edge.heads import HeadSet
from cecollm.edge.partition import EdgePartition
from cecollm.edge.sender import UploadSender
from cecollm.edge.session import CloudGone, EdgeResult, EdgeStats, Generation
from cecollm.errors import UserError
from cecollm.generation import TokenRecord, decode_greedily
from cecollm.layers import DecoderRunner
from cecollm.prompting import eos_ids
from cecollm.split import Split
from cecollm.wire import edge_cloud as ep
from cecollm.wire.rpc import CallTimeout, RpcSocket
from cecollm.wire.wire import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 64 << 10  # the cloud's replies (WELCOME, TOKEN, ERROR) are small: anything larger is refused
REJOIN_HELLO_SECONDS = 2.0  # a try to rejoin the cloud waits this long for WELCOME (the edge is stalled meanwhile)


@dataclass(frozen=True)
class EdgeConfig:
    """How an edge device runs; `cecollm-edge` options take their defaults from here."""

    device_id: int = 0  # this device's id: the cloud keeps one state per device
    broker: str = "tcp://127.0.0.1:5555"  # the broker's request address
    upload: str = ""  # the upload address; "" = derived from `broker` (tcp port + 1, ipc ...requests -> ...uploads)
    shm: bool | None = None  # write rows into the cloud's shared memory; None = yes for ipc:// addresses
    threshold: float = DEFAULT_THRESHOLD  # an exit decides when its top-1 probability reaches this; 1.0: no exits
    standalone: bool = False  # never ask the cloud
    exact: bool = True  # every token a draft the cloud verifies (the full model's output); False: the paper's mode
    wait_below: float = DEFAULT_WAIT_BELOW  # exact mode: below this draft confidence wait for the cloud instead
    fp16: bool = True  # upload 2-byte rows: the model's bfloat16/float16, float16 for float32 (False: float32)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # stop after this many tokens (or at EOS)
    timeout: float = 5.0  # seconds a single-token request may take before the edge decides it itself
    hello_timeout: float = 10.0  # seconds to wait for the cloud to open a session
    max_timeouts: int = 3  # timeouts in a row after which the rest is decided on the edge
    keys: str = ""  # this device's key bundle (`cecollm keys`); "" = $CECOLLM_HOME/keys/bundles/device-<device_id>
    insecure: bool = False  # no keys: for a broker started with --insecure (loopback only)
    take_over: bool = False  # take the device id over from another edge still using it (else refused)
    rejoin_seconds: float = 1.0  # going on alone after losing the cloud: first wait before trying it again
    rejoin_max_seconds: float = 30.0  # the wait doubles after each failed try, up to this

    def client_keys(self):
        """The device's CURVE keys (security.ClientKeys), or None when insecure."""
        if self.insecure:
            return None
        from cecollm.wire.security import ClientKeys, bundle

        return ClientKeys.load(self.keys or bundle(f"device-{self.device_id}"))

    @property
    def upload_address(self) -> str:
        if self.upload:
            return self.upload
        if self.broker.startswith("ipc://") and self.broker.endswith("requests"):
            return self.broker[: -len("requests")] + "uploads"
        head, _, port = self.broker.rpartition(":")
        if self.broker.startswith("tcp://") and port.isdigit():
            return f"{head}:{int(port) + 1}"
        raise ValueError(f"cannot derive the upload address from {self.broker!r}; give it")

    @property
    def use_shm(self) -> bool:
        return self.broker.startswith("ipc://") if self.shm is None else self.shm


class _TappingRunner(DecoderRunner):
    """A DecoderRunner that keeps the last row after the last exit's layer (for fallbacks)."""

    def __init__(self, model: torch.nn.Module, tap_layer: int) -> None:
        super().__init__(model)
        self.tap_index = tap_layer - 1
        self.tapped: torch.Tensor | None = None  # [1, 1, hidden]

    def run_layer(self, index, x, start, cache, rope):
        out = super().run_layer(index, x, start, cache, rope)
        if index == self.tap_index:
            self.tapped = out[:, -1:]
        return out


class EdgeClient:
    """One edge device: a model, its split and heads, connected to a broker."""

    def __init__(self, model: torch.nn.Module, identity: str, split: Split, heads: HeadSet, config: EdgeConfig,
                 context: zmq.Context | None = None) -> None:
        self.model = model
        self.identity = identity
        self.split = split
        self.heads = heads
        self.config = config
        self.runner = _TappingRunner(model, split.last_exit)
        self.eos = eos_ids(model)
        self.dtype = name_of(model.dtype)  # the compute dtype, which the cloud must share
        self.wire_dtype = torch_dtype(wire_dtype(self.dtype, config.fp16))  # of the uploaded rows
        self.context = context or zmq.Context.instance()
        self._rpc: RpcSocket | None = None
        self._sender: UploadSender | None = None
        self._seq = 0
        self.instance = secrets.randbits(64) or 1  # tells this edge apart from another with the same device id
        self.session: int | None = None  # the cloud session of the generation under way
        self.capacity: int | None = None  # positions the cloud holds per session, from its last WELCOME

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
        if self._rpc is not None:
            self._rpc.close()
        self._sender = self._rpc = None

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> None:
        if self._rpc is None:
            keys = self.config.client_keys()
            self._rpc = RpcSocket(self.context, self.config.broker, keys=keys, max_reply_bytes=MAX_REPLY_BYTES)
            self._sender = UploadSender(self.context, self.config.upload_address, self.config.timeout, keys=keys)

    # ---- one request -------------------------------------------------------------------
    def _request(self, msg, timeout: float, stats: EdgeStats):
        """The cloud's reply to `msg` (TOKEN/WELCOME/ERROR), or CallTimeout."""
        rpc = self._rpc
        sent, got = rpc.bytes_sent, rpc.bytes_received
        t0 = time.perf_counter()
        rpc.send(msg.to_frames())
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    reply = ep.parse(rpc.receive(deadline), ep.REPLIES)
                except ProtocolError as exc:
                    log.warning("reply refused: %s", exc)
                    continue
                if reply.seq == msg.seq:
                    return reply
                log.debug("late reply to request %d skipped", reply.seq)
        finally:
            stats.comm_seconds += time.perf_counter() - t0
            stats.bytes_up += rpc.bytes_sent - sent
            stats.bytes_down += rpc.bytes_received - got

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % (1 << 32)
        return self._seq

    def _open(self, stats: EdgeStats, kept: list, drafts_for=None, timeout: float | None = None) -> int:
        """Open a session (HELLO, waiting `timeout` s, default hello_timeout) and queue every kept row again
        (with `drafts_for(start, n)`, the exact mode's drafts); the session number."""
        c = self.config
        timeout = c.hello_timeout if timeout is None else timeout
        hello = ep.Hello(c.device_id, self._next_seq(), self.identity, self.split.n_layers, self.split.exits,
                         self.split.upload_layer, self.dtype, name_of(self.wire_dtype), c.use_shm,
                         self.instance, c.take_over)
        try:
            reply = self._request(hello, timeout, stats)
        except CallTimeout:
            raise CloudGone(f"the cloud at {c.broker} did not answer HELLO within {timeout:g} s") from None
        if isinstance(reply, ep.Error) and reply.code in (ErrorCode.MISMATCH, ErrorCode.IN_USE, ErrorCode.FORBIDDEN):
            raise UserError(f"the cloud at {c.broker} refused device {c.device_id}: {reply.message}")
        if isinstance(reply, ep.Error):
            raise CloudGone(f"the cloud refused the session: {reply.message}")
        self.capacity = reply.capacity
        self._sender.open(c.device_id, reply.session, reply.segment if c.use_shm else "", reply.capacity,
                          reply.rows_offset)
        for start, rows in kept:
            self._sender.rows(start, rows, drafts_for(start, len(rows)) if drafts_for else ())
        return reply.session

    def probe(self, timeout: float | None = None) -> int:
        """Open a session and end it at once: the cloud's capacity in positions per session. CloudGone
        when the cloud does not answer within `timeout` s (default hello_timeout) or refuses; a
        UserError when it serves another model or split."""
        self._connect()
        self._open(EdgeStats(), [], timeout=timeout)
        self._sender.end()
        self._sender.flush()
        return self.capacity

    def _ask(self, session: int, position: int, stats: EdgeStats):
        """(token, prob) from the cloud, None on a timeout; CloudGone when it lost the state."""
        reply = self._request(ep.Decide(self.config.device_id, self._next_seq(), session, position),
                              self.config.timeout, stats)
        if isinstance(reply, ep.Token):
            stats.cloud_seconds += reply.cloud_seconds
            stats.comm_seconds -= reply.cloud_seconds
            return reply.token, reply.prob
        if reply.code in (ErrorCode.UNKNOWN_DEVICE, ErrorCode.MISSING):
            raise LookupError(reply.message)  # state lost: worth a re-upload
        raise CloudGone(f"the cloud refused position {position}: {reply.message}")

    def _last_exit(self) -> tuple[int, float]:
        assert self.runner.tapped is not None, "the last exit's row is tapped whenever no exit decided"
        return self.heads.heads[self.split.last_exit].top1(self.runner.tapped, self.runner.lm_head)

    # ---- a generation ------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], on_token: Callable[[TokenRecord], None] | None = None,
                 max_new_tokens: int | None = None) -> EdgeResult:
        """Generate greedily from `prompt_ids`, at most `max_new_tokens` (default: the config's); `on_token`
        sees each token as soon as it is decided, and may raise StopGeneration to end the generation
        there (any other exception ends it too, and propagates)."""
        c = self.config
        budget = c.max_new_tokens if max_new_tokens is None else max_new_tokens
        result = EdgeResult([], [], EdgeStats(prompt_tokens=len(prompt_ids)))
        gen = Generation(EdgePartition(self.runner, self.split, self.heads, c.threshold,
                                        last_exit_decides=c.standalone or c.exact, upload=not c.standalone),
                          result.stats)
        self._start(gen)
        try:  # whatever happens (an exception in on_token, Ctrl-C), the cloud hears that it ended
            if c.exact:
                ExactRun(self, gen, prompt_ids, result, on_token, budget).run()
            else:
                decode_greedily(prompt_ids, budget, self.eos, lambda ids: self._step(gen, ids), result,
                                on_token)
        finally:
            self._finish(gen)
        return result

    def _start(self, gen: Generation) -> None:
        if self.config.standalone:
            gen.stats.standalone_reason = "asked for (--standalone)"
            return
        self._connect()
        try:
            gen.session = self._open(gen.stats, gen.kept)
        except CloudGone as exc:  # the exact mode finishes a generation without the cloud unverified (exact.py)
            self._go_alone(gen, str(exc), rejoin=not self.config.exact)
        self.session = gen.session

    def _step(self, gen: Generation, inputs: list[int]):
        """(token, decided by, confidence) for the next position."""
        stats = gen.stats
        t0 = time.perf_counter()
        out = gen.edge.step(inputs)
        uploads = [(u.start, to_numpy(u.hidden[0].to(self.wire_dtype).contiguous())) for u in out.uploads]
        stats.edge_seconds += time.perf_counter() - t0
        if gen.session is None and gen.rejoin_at is not None and time.monotonic() >= gen.rejoin_at:
            self._rejoin(gen)  # before this step's rows are kept: a rejoin uploads the kept ones
        for start, rows in uploads:  # [n, hidden] in the wire dtype; kept alone too, for a rejoin
            gen.kept.append((start, rows))
            if gen.session is not None:
                self._sender.rows(start, rows)
        if out.token is not None:
            stats.edge_tokens += 1
            return out.token, out.exit, out.confidence
        answer = None
        if gen.session is not None:
            try:
                answer, gen.session = self._cloud_token(gen.session, out.position, stats, gen.kept)
            except CloudGone as exc:
                self._go_alone(gen, str(exc), rejoin=True)
            self.session = gen.session
        if answer is not None:
            gen.timeouts_in_row = 0
            stats.cloud_tokens += 1
            return answer[0], "cloud", answer[1]
        if gen.session is not None:  # the request timed out
            gen.timeouts_in_row += 1
            if gen.timeouts_in_row >= self.config.max_timeouts:
                self._go_alone(gen, f"{gen.timeouts_in_row} requests in a row timed out", rejoin=True)
        stats.fallback_tokens += 1
        token, conf = self._last_exit()
        return token, self.split.last_exit, conf

    def _go_alone(self, gen: Generation, why: str, rejoin: bool = False) -> None:
        """The rest of the generation runs on the edge; with `rejoin`, the cloud is tried again from time to
        time (doubling waits) and taken up again once it answers."""
        if self._sender is not None and gen.session is not None:
            self._sender.end()  # the cloud releases the session now, not after its idle TTL
        gen.session = self.session = None
        gen.stats.standalone_reason = why
        gen.timeouts_in_row = 0
        if rejoin and gen.rejoin_at is None:
            gen.rejoin_wait, gen.alone_since = self.config.rejoin_seconds, time.monotonic()
            gen.rejoin_at = gen.alone_since + gen.rejoin_wait
        log.warning("device %d: going on on the edge alone: %s%s", self.config.device_id, why,
                    f" (trying the cloud again in {gen.rejoin_wait:g} s)" if gen.rejoin_at is not None else "")

    def _rejoin(self, gen: Generation) -> None:
        """Try to open a session again and upload every kept row; on failure wait twice as long next time."""
        try:
            gen.session = self.session = self._open(gen.stats, gen.kept, timeout=REJOIN_HELLO_SECONDS)
        except UserError as exc:  # the cloud that came back refuses this edge: it finishes alone, and says why
            gen.rejoin_at = None
            gen.stats.standalone_reason = str(exc)
            log.warning("device %d: %s; going on alone", self.config.device_id, exc)
            return
        except CloudGone:
            gen.rejoin_wait = min(gen.rejoin_wait * 2, self.config.rejoin_max_seconds)
            gen.rejoin_at = time.monotonic() + gen.rejoin_wait
            log.info("device %d: the cloud is still away; next try in %g s", self.config.device_id, gen.rejoin_wait)
            return
        gen.rejoin_at = None
        gen.stats.rejoins += 1
        gen.stats.standalone_reason = ""
        log.warning("device %d: the cloud is back after %.1f s alone; going on with it (%d positions uploaded again)",
                    self.config.device_id, time.monotonic() - gen.alone_since, sum(len(r) for _, r in gen.kept))

    def _finish(self, gen: Generation) -> None:
        if gen.session is not None:
            self._sender.end()
        if self._sender is not None:
            self._sender.flush()
            gen.stats.bytes_up += self._sender.bytes_sent
            gen.stats.shm_bytes += self._sender.shm_bytes
            self._sender.bytes_sent = self._sender.shm_bytes = 0

    def _cloud_token(self, session: int, position: int, stats: EdgeStats, kept: list):
        """((token, prob) or None on a timeout, session); reopens the session once if the state was lost."""
        for attempt in range(2):
            try:
                return self._ask(session, position, stats), session
            except CallTimeout:
                stats.timeouts += 1
                return None, session
            except LookupError as exc:
                if attempt:
                    raise CloudGone(f"the cloud lost the device's state again: {exc}") from None
                log.info("device %d: %s; opening a new session and uploading again", self.config.device_id, exc)
            stats.reuploads += 1
            session = self._open(stats, kept)
        raise AssertionError("the second attempt returns or raises")
