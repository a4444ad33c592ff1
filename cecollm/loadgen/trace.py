"""Edge traces for fanout: what one real edge device sent the cloud, when, and what came back.

A trace is a JSONL file (one header line, then one line per generation and one per event)
plus the upload-layer rows it sent, stored as a .npy array next to it (`<trace>.rows.npy`,
[total rows, hidden] in the wire dtype; never pickled). Events, per generation, in order:
hello (opens a session), upload (rows [start, start + rows) = array rows [row, row + rows)),
decide (asks the cloud for the token after `position`; `token` is its answer), end. Each
event carries `t` (seconds since the generation began) and `gap`: the edge's own time between
the end of the previous event (a reply received, or rows queued) and this one -- its compute,
which a replay sleeps instead of doing.

`TracingClient` is an EdgeClient that records all this while it runs a real generation; it is
also what live fanout runs, for its per-request latencies.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson

from cecollm.dtypes import numpy_dtype
from cecollm.edge.client import EdgeClient
from cecollm.edge.sender import UploadSender
from cecollm.edge.session import EdgeResult
from cecollm.errors import UserError
from cecollm.wire import edge_cloud as ep
from cecollm.wire.rpc import CallTimeout, RpcSocket

log = logging.getLogger(__name__)

TRACE_FORMAT = "cecollm-fanout-trace/1"
EVENT_KINDS = ("hello", "upload", "decide", "end")


@dataclass(frozen=True)
class TraceHeader:
    """Who recorded the trace: the HELLO every replaying device sends is built from this."""

    model: str  # the model spec the recording edge loaded
    identity: str  # LoadedModel.identity (the broker refuses another model)
    n_layers: int
    exits: tuple[int, ...]
    upload_layer: int
    wire_dtype: str  # "float16" | "bfloat16" | "float32"
    hidden: int  # row width
    threshold: float  # the recording edge's exit threshold
    max_new_tokens: int
    rows_file: str  # the .npy file with every uploaded row, relative to the trace (bfloat16 stored as uint16)
    dtype: str = "float32"  # the recording edge's compute dtype (a replaying device's HELLO says it)
    format: str = TRACE_FORMAT


@dataclass(frozen=True)
class TraceEvent:
    kind: str  # one of EVENT_KINDS
    t: float  # seconds since the generation began (when the event started)
    gap: float  # edge time since the previous event ended (what a replay sleeps)
    latency: float = 0.0  # hello/decide: seconds until the reply
    start: int = 0  # upload: first position
    rows: int = 0  # upload: row count
    row: int = 0  # upload: index of its first row in the rows array
    nbytes: int = 0  # upload: bytes of the rows
    position: int = 0  # decide: the position asked about
    token: int = -1  # decide: the cloud's token


@dataclass
class TraceGeneration:
    prompt_index: int
    prompt_tokens: int
    token_ids: list[int]  # the whole generation (edge and cloud tokens)
    decided_by: list  # per token: exit layer or "cloud"
    events: list[TraceEvent] = field(default_factory=list)

    @property
    def decides(self) -> list[TraceEvent]:
        return [e for e in self.events if e.kind == "decide"]


@dataclass
class Trace:
    header: TraceHeader
    generations: list[TraceGeneration]
    rows: np.ndarray  # [total rows, hidden] wire dtype

    def save(self, path: str | Path) -> Path:
        """Write the JSONL trace and its rows (.npy beside it); the rows path."""
        path = Path(path)
        rows_path = path.with_name(path.name + ".rows.npy")
        header = TraceHeader(**{**asdict(self.header), "rows_file": rows_path.name})
        path.parent.mkdir(parents=True, exist_ok=True)
        bf16 = self.rows.dtype == numpy_dtype("bfloat16")  # .npy has no bfloat16: its bits as uint16
        np.save(rows_path, self.rows.view(np.uint16) if bf16 else self.rows, allow_pickle=False)
        with open(path, "wb") as out:
            out.write(orjson.dumps({"kind": "trace", **asdict(header)}) + b"\n")
            for g in self.generations:
                line = {"kind": "generation", "prompt_index": g.prompt_index, "prompt_tokens": g.prompt_tokens,
                        "token_ids": g.token_ids, "decided_by": g.decided_by}
                out.write(orjson.dumps(line) + b"\n")
                for e in g.events:
                    out.write(orjson.dumps({"kind": e.kind, **_event_fields(e)}) + b"\n")
        self.header = header
        return rows_path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace; a missing or malformed file is a UserError (one line)."""
        path = Path(path)
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise UserError(f"cannot read the trace {path}: {exc.strerror}") from None
        try:
            first = orjson.loads(lines[0]) if lines else {}
            if first.pop("kind", None) != "trace" or first.get("format") != TRACE_FORMAT:
                raise UserError(f"{path} is not a fanout trace ({TRACE_FORMAT}); record one with --record")
            first["exits"] = tuple(first["exits"])
            header = TraceHeader(**first)
            generations: list[TraceGeneration] = []
            for number, line in enumerate(lines[1:], 2):
                row = orjson.loads(line)
                kind = row.pop("kind", None)
                if kind == "generation":
                    generations.append(TraceGeneration(**row))
                elif kind in EVENT_KINDS and generations:
                    generations[-1].events.append(TraceEvent(kind, **row))
                else:
                    raise UserError(f"{path}:{number}: unexpected line (kind {kind!r})")
        except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
            raise UserError(f"{path} is not a readable fanout trace: {exc}") from None
        rows_path = path.with_name(header.rows_file)
        try:
            rows = np.load(rows_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the trace's rows {rows_path}: {exc}") from None
        if header.wire_dtype == "bfloat16" and rows.dtype == np.uint16:
            rows = rows.view(numpy_dtype("bfloat16"))
        if rows.ndim != 2 or rows.shape[1] != header.hidden or rows.dtype.name != header.wire_dtype:
            raise UserError(f"{rows_path}: rows {rows.dtype.name} {rows.shape} do not fit "
                            f"{header.wire_dtype} [n, {header.hidden}]")
        trace = cls(header, generations, rows)
        trace.check()
        return trace

    def check(self) -> None:
        """Every upload's rows lie inside the rows array; each generation opens and ends a session."""
        for g in self.generations:
            kinds = [e.kind for e in g.events]
            if not kinds or kinds[0] != "hello" or kinds[-1] != "end" or kinds.count("hello") != 1:
                raise UserError(f"trace generation {g.prompt_index}: expected hello ... end, got {kinds[:3]}...")
            for e in g.events:
                if e.kind == "upload" and not (e.row >= 0 and e.row + e.rows <= len(self.rows) and e.rows > 0):
                    raise UserError(f"trace generation {g.prompt_index}: upload rows [{e.row}, {e.row + e.rows}) "
                                    f"outside the {len(self.rows)} stored rows")

    def summary(self) -> dict:
        decides = [e for g in self.generations for e in g.decides]
        tokens = sum(len(g.token_ids) for g in self.generations)
        latency = round(1000 * float(np.mean([e.latency for e in decides])), 3) if decides else None
        return {"generations": len(self.generations), "tokens": tokens, "cloud_requests": len(decides),
                "uploads": sum(e.kind == "upload" for g in self.generations for e in g.events),
                "rows": int(len(self.rows)), "row_bytes": int(self.rows.nbytes),
                "edge_seconds": round(sum(e.gap for g in self.generations for e in g.events), 4),
                "recorded_latency_ms_mean": latency}


def _event_fields(e: TraceEvent) -> dict:
    """The fields that matter for this kind of event (keeps the JSONL readable)."""
    keep = {"hello": ("t", "gap", "latency"), "upload": ("t", "gap", "start", "rows", "row", "nbytes"),
            "decide": ("t", "gap", "latency", "position", "token"), "end": ("t", "gap")}[e.kind]
    return {k: round(getattr(e, k), 6) if isinstance(getattr(e, k), float) else getattr(e, k) for k in keep}


class _Recorder:
    """Timestamps of one client's events; rows are kept only when a trace is being written."""

    def __init__(self, keep_rows: bool) -> None:
        self.keep_rows = keep_rows
        self.lock = threading.Lock()  # the sender thread and the compute thread both report
        self.generations: list[TraceGeneration] = []
        self.rows: list[np.ndarray] = []
        self.row_count = 0
        self.t0 = 0.0
        self.last_end = 0.0
        self.latencies: list[float] = []  # seconds, every DECIDE of this client
        self.cloud_seconds = 0.0

    def begin(self, prompt_index: int, prompt_tokens: int) -> None:
        self.t0 = self.last_end = time.perf_counter()
        self.generations.append(TraceGeneration(prompt_index, prompt_tokens, [], []))

    def add(self, kind: str, began: float, ended: float, **fields) -> None:
        with self.lock:
            event = TraceEvent(kind, began - self.t0, max(0.0, began - self.last_end), **fields)
            self.generations[-1].events.append(event)
            self.last_end = ended

    def add_rows(self, start: int, rows: np.ndarray) -> None:
        now = time.perf_counter()
        with self.lock:
            row = self.row_count
            self.row_count += rows.shape[0]
            if self.keep_rows:
                self.rows.append(np.array(rows, copy=True))
        self.add("upload", now, now, start=start, rows=rows.shape[0], row=row, nbytes=rows.nbytes)


class _TracingSender(UploadSender):
    """The edge's real sender that also notes each upload and the END (adapter, see TracingClient)."""

    def __init__(self, context, address: str, send_timeout: float, recorder: _Recorder, keys=None) -> None:
        super().__init__(context, address, send_timeout, keys)
        self.recorder = recorder

    def rows(self, start: int, rows: np.ndarray, drafts: tuple[int, ...] = ()) -> None:
        self.recorder.add_rows(start, rows)
        super().rows(start, rows, drafts)

    def end(self) -> None:
        now = time.perf_counter()
        self.recorder.add("end", now, now)
        super().end()


class TracingClient(EdgeClient):
    """A real EdgeClient whose requests, uploads and their timings are recorded.

    Adapter: EdgeClient has no hook for observing its traffic, so this overrides `_connect`
    (to build a recording sender; same three lines as the original) and `_request`."""

    def __init__(self, *args, keep_rows: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = _Recorder(keep_rows)

    def _connect(self) -> None:
        if self._rpc is None:
            keys = self.config.client_keys()
            self._rpc = RpcSocket(self.context, self.config.broker, keys=keys)
            self._sender = _TracingSender(self.context, self.config.upload_address, self.config.timeout,
                                          self.recorder, keys=keys)

    def _request(self, msg, timeout, stats):
        began = time.perf_counter()
        try:
            reply = super()._request(msg, timeout, stats)
        except CallTimeout:
            if isinstance(msg, ep.Decide):
                self.recorder.add("decide", began, time.perf_counter(), latency=timeout, position=msg.position)
            raise
        ended = time.perf_counter()
        if isinstance(msg, ep.Hello):
            self.recorder.add("hello", began, ended, latency=ended - began)
        else:
            token = reply.token if isinstance(reply, ep.Token) else -1
            self.recorder.add("decide", began, ended, latency=ended - began, position=msg.position, token=token)
            self.recorder.latencies.append(ended - began)
            if isinstance(reply, ep.Token):
                self.recorder.cloud_seconds += reply.cloud_seconds
        return reply

    def generate_traced(self, prompt_index: int, prompt_ids: list[int]) -> EdgeResult:
        self.recorder.begin(prompt_index, len(prompt_ids))
        result = self.generate(prompt_ids)
        self._sender.flush()
        g = self.recorder.generations[-1]
        g.token_ids = list(result.token_ids)
        g.decided_by = [t.decided_by for t in result.tokens]
        return result

    def trace(self, header: TraceHeader) -> Trace:
        """The recorded trace (needs keep_rows=True)."""
        assert self.recorder.keep_rows, "rows are kept only when recording a trace"
        hidden = header.hidden
        rows = (np.concatenate(self.recorder.rows) if self.recorder.rows
                else np.zeros((0, hidden), dtype=header.wire_dtype))  # [total rows, hidden]
        return Trace(header, self.recorder.generations, rows)


def unclean(result: EdgeResult) -> str:
    """Why a recorded generation cannot serve as a trace ("" if it can)."""
    s = result.stats
    if s.standalone_reason:
        return f"the edge went on alone ({s.standalone_reason})"
    if s.timeouts or s.reuploads or s.fallback_tokens:
        return f"{s.timeouts} timeouts, {s.reuploads} re-uploads, {s.fallback_tokens} fallback tokens"
    return ""
