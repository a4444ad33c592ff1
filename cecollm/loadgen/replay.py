"""A device that replays a recorded edge trace against the broker, with its own device id.

It speaks the broker's real edge protocol through the edge's own pieces: requests are
edge_protocol messages on an RpcSocket, rows and END go through the edge's UploadSender (TCP
frames, or shared memory when the edge would use it). What the edge computed between two
events is replaced by sleeping the recorded time (times `pace`); after a reply, the next
event's time counts from when the reply came, as on a real edge that waits for its token.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING

import zmq

from cecollm.edge.sender import UploadSender
from cecollm.errors import UserError
from cecollm.loadgen.trace import Trace, TraceEvent, TraceGeneration
from cecollm.wire import edge_cloud as ep
from cecollm.wire.rpc import CallTimeout, RpcSocket
from cecollm.wire.wire import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from cecollm.loadgen.config import FanoutConfig
    from cecollm.loadgen.report import ClientSummary

log = logging.getLogger(__name__)


class _Abort(Exception):
    """This generation cannot go on (the message says why); the device goes to the next one."""


class _Lost(Exception):
    """The cloud lost the session's state (evicted, or a content manager that was restarted)."""


class ReplayDevice:
    """One replaying device: its sockets, its counters (a ClientSummary)."""

    def __init__(self, config: FanoutConfig, trace: Trace, summary: ClientSummary, stop, user_errors: list) -> None:
        self.config = config
        self.trace = trace
        self.summary = summary
        self.stop = stop  # threading.Event: give up between events
        self.user_errors = user_errors
        self.edge = config.edge
        self.device_id = summary.device_id
        self.instance = secrets.randbits(64) or 1  # one edge: its HELLOs reopen its own session
        self.seq = 0

    def run(self, order: list[int], delay: float, progress=None) -> None:
        """Replay the trace's generations in `order`, after `delay` seconds."""
        if self.stop.wait(delay):
            return
        context = zmq.Context.instance()
        keys = self.edge.client_keys()
        self.rpc = RpcSocket(context, self.edge.broker, keys=keys)
        self.sender = UploadSender(context, self.edge.upload_address, self.config.timeout, keys=keys)
        t0 = time.perf_counter()
        try:
            for index in order:
                if self.stop.is_set():
                    break
                self._generation(self.trace.generations[index])
                if progress:
                    progress(1)
        except UserError as exc:
            self.user_errors.append(exc)
            self.stop.set()
        except Exception as exc:  # noqa: BLE001 (counted and reported; the other devices go on)
            log.exception("device %d failed", self.device_id)
            self.summary.error(f"{exc.__class__.__name__}: {exc}")
        finally:
            self.sender.flush()
            self.sender.close()
            self.rpc.close()
            self.summary.wall_seconds = time.perf_counter() - t0

    # ---- one generation ----------------------------------------------------------------
    def _generation(self, gen: TraceGeneration) -> None:
        s = self.summary
        s.generations += 1
        s.edge_tokens += sum(by != "cloud" for by in gen.decided_by)
        replies: list[int] = []
        sent: list[TraceEvent] = []  # this session's uploads, for a re-upload
        session = None
        last = time.perf_counter()
        try:
            for event in gen.events:
                if self.stop.wait(max(0.0, last + event.gap * self.config.pace - time.perf_counter())):
                    break
                if event.kind == "hello":
                    session, sent = self._hello(), []
                elif event.kind == "upload":
                    self._upload(event)
                    sent.append(event)
                elif event.kind == "decide":
                    token, session = self._decide_again(session, event, sent)
                    if token is not None:
                        replies.append(token)
                else:
                    self.sender.end()
                    session = None
                last = time.perf_counter()
        except _Abort as exc:
            s.error(f"generation {gen.prompt_index}: {exc}")
        if session is not None:
            self.sender.end()
        s.outputs.append(replies)

    def _hello(self) -> int:
        h = self.trace.header
        msg = ep.Hello(self.device_id, self._next_seq(), h.identity, h.n_layers, h.exits, h.upload_layer,
                       h.dtype, h.wire_dtype, self.edge.use_shm, self.instance)
        reply = self._call(msg, self.edge.hello_timeout)
        if reply is None:
            raise _Abort(f"no WELCOME within {self.edge.hello_timeout:g} s")
        if isinstance(reply, ep.Error) and reply.code == ErrorCode.MISMATCH:
            raise UserError(f"the broker at {self.edge.broker} does not serve the trace's model and split: "
                            f"{reply.message}")
        if isinstance(reply, ep.Error) and reply.code in (ErrorCode.IN_USE, ErrorCode.FORBIDDEN):
            raise UserError(f"the broker at {self.edge.broker} refused device {self.device_id}: {reply.message}")
        if isinstance(reply, ep.Error):
            raise _Abort(f"session refused: {reply.message}")
        self.sender.open(self.device_id, reply.session, reply.segment if self.edge.use_shm else "", reply.capacity,
                         reply.rows_offset)
        return reply.session

    def _upload(self, event: TraceEvent) -> None:
        self.sender.rows(event.start, self.trace.rows[event.row:event.row + event.rows])  # [n, hidden]

    def _decide_again(self, session: int, event: TraceEvent, sent: list[TraceEvent]) -> tuple[int | None, int]:
        """(token or None, session): as a real edge, a lost state is reopened and uploaded again, once."""
        try:
            return self._decide(session, event), session
        except _Lost as exc:
            log.info("device %d: %s; opening a new session and uploading again", self.device_id, exc)
        self.summary.reuploads += 1
        session = self._hello()
        for up in sent:
            self._upload(up)
        try:
            return self._decide(session, event), session
        except _Lost as exc:
            raise _Abort(f"the cloud lost the state again: {exc}") from None

    def _decide(self, session: int | None, event: TraceEvent) -> int | None:
        """The cloud's token for `event` (checked against the trace), None on a timeout; _Lost when the cloud
        lost the session's state."""
        s = self.summary
        assert session is not None, "a trace generation decides only inside its session"
        s.requests += 1
        began = time.perf_counter()
        reply = self._call(ep.Decide(self.device_id, self._next_seq(), session, event.position), self.config.timeout)
        if reply is None:
            s.timeouts += 1
            return None
        s.latencies.append(time.perf_counter() - began)
        if isinstance(reply, ep.Error) and reply.code in (ErrorCode.UNKNOWN_DEVICE, ErrorCode.MISSING):
            raise _Lost(f"position {event.position}: {reply.message}")
        if isinstance(reply, ep.Error):
            raise _Abort(f"position {event.position}: {reply.code.name}: {reply.message}")
        s.cloud_tokens += 1
        s.cloud_seconds += reply.cloud_seconds
        if reply.token != event.token:
            s.mismatches += 1
            s.error(f"position {event.position}: the cloud answered {reply.token}, the trace has {event.token}")
        return reply.token

    # ---- the request channel -----------------------------------------------------------
    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % (1 << 32)
        return self.seq

    def _call(self, msg, timeout: float):
        """The reply to `msg` (late replies to earlier requests are skipped), None on a timeout."""
        self.rpc.send(msg.to_frames())
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = ep.parse(self.rpc.receive(deadline), ep.REPLIES)
            except CallTimeout:
                return None
            except ProtocolError as exc:
                log.warning("device %d: reply refused: %s", self.device_id, exc)
                continue
            if reply.seq == msg.seq:
                return reply
