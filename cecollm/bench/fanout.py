"""Fanout: many edge devices against one broker, each with its own device id.

Two modes. `live`: N real EdgeClients (threads sharing one model) generate; on a small machine
they fight the cloud for the CPU, so what is measured is the machine, not the cloud. `replay`:
a trace recorded from one real edge run (`record_trace`, fanout_trace.py) is replayed by N
devices that send the same HELLO, uploads, DECIDE requests and END at the recorded pace, the
edge's compute replaced by sleeping its recorded time: the cloud does its real work for N
devices, the edge side costs nothing. The cloud is exact and deterministic, so every reply must
equal the token in the trace; a different one is counted as an error.

`run_fanout(FanoutConfig(...)) -> FanoutReport`: per-request (DECIDE) latency p50/p99, cloud
tokens/s, errors, timeouts, and the content manager's memory (fanout_memory.py).
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from cecollm.bench.fanout_memory import MemoryMonitor, find_content_manager
from cecollm.config import DEFAULT_MODEL
from cecollm.errors import UserError

if TYPE_CHECKING:  # these import torch: loaded where they are used, so the CLI's --help is fast
    from cecollm.bench.fanout_trace import Trace
    from cecollm.edge.client import EdgeConfig

log = logging.getLogger(__name__)

MODES = ("live", "replay")


@dataclass(frozen=True)
class FanoutConfig:
    """One fanout run; tools/fanout.py options take their defaults from here."""

    clients: int = 1  # devices running at once, each with its own device id
    broker: str = "tcp://127.0.0.1:5555"  # the broker's request address
    upload: str = ""  # the upload address; "" = derived as the edge does (tcp port + 1, ipc ...uploads)
    prompts: str | tuple[str, ...] = ""  # a JSONL prompts file, or the prompts themselves (live mode, recording)
    n_prompts: int = 0  # use the first n prompts; 0 = all
    raw: bool = False  # use prompts as they are, without the chat template
    mode: str = "replay"  # "live": real EdgeClients; "replay": devices replay `trace`
    trace: str = ""  # the trace file (replay reads it, record_trace writes it; rows in <trace>.rows.npy)
    model: str = DEFAULT_MODEL  # live/record: a transformers directory, .gguf file, or the default model's name
    heads: str = ""  # live/record: exit heads file; "" = the model's default heads
    exits: str = ""  # live/record: exits "8,15"; "" = the model's default split
    upload_layer: int = 0  # live/record: layer whose output is uploaded; 0 = the last exit
    threshold: float = 0.8  # live/record: exit confidence threshold; 1.0 disables exits
    fp16: bool = True  # live/record: float16 rows on the wire (False: float32)
    max_new_tokens: int = 64  # live/record: tokens per generation at most
    timeout: float = 20.0  # seconds a request may take before it counts as a timeout
    pace: float = 1.0  # replay: recorded edge time is multiplied by this (0: requests back to back)
    stagger: float = 0.0  # clients start at random offsets in [0, stagger) seconds (seeded)
    rotate: bool = True  # client i starts at generation i (mod count): clients do not move in lockstep
    seed: int = 0  # seeds the start offsets
    device_base: int = 1000  # client i is device device_base + i
    broker_pid: int = 0  # the broker's pid, to find its content manager; 0 = any process bound to the upload address
    cm_pid: int = 0  # the content manager's pid if known (wins over broker_pid)
    memory_interval: float = 0.1  # seconds between memory samples
    threads: int = 1  # torch threads (live/record)

    @property
    def edge(self) -> "EdgeConfig":
        """The EdgeConfig a device of this run uses (device id set per client)."""
        from cecollm.edge.client import EdgeConfig

        return EdgeConfig(device_id=self.device_base, broker=self.broker, upload=self.upload, threshold=self.threshold,
                          fp16=self.fp16, max_new_tokens=self.max_new_tokens, timeout=self.timeout,
                          max_timeouts=1 << 30)


@dataclass
class ClientSummary:
    """What one device did."""

    device_id: int
    generations: int = 0
    requests: int = 0  # DECIDE requests sent
    cloud_tokens: int = 0  # tokens the cloud answered
    edge_tokens: int = 0  # tokens an exit decided (live) or the trace says an exit decided (replay)
    errors: int = 0  # error replies, refused sessions, mismatches, exceptions
    timeouts: int = 0  # requests without a reply in time
    mismatches: int = 0  # replay: replies that differ from the trace (also counted in errors)
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    cloud_seconds: float = 0.0  # worker compute for this device's requests, as the replies report it
    wall_seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)  # token ids per generation (replay: the cloud's replies)
    error_messages: list[str] = field(default_factory=list)  # the first few
    latencies: list[float] = field(default_factory=list, repr=False)  # seconds per DECIDE (not in to_dict)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_messages) < 5:
            self.error_messages.append(message)


@dataclass
class FanoutReport:
    mode: str
    clients: int
    generations: int
    requests: int  # DECIDE requests sent, all devices
    cloud_tokens: int  # tokens the cloud answered
    edge_tokens: int
    latency_p50_ms: float | None  # per DECIDE request, send to reply, all devices
    latency_p99_ms: float | None
    latency_mean_ms: float | None
    latency_max_ms: float | None
    cloud_tokens_per_s: float  # cloud tokens / wall seconds
    cloud_seconds: float  # worker compute, all devices (cloud_seconds / wall_seconds ~ busy workers)
    wall_seconds: float  # first device's start to last device's end
    errors: int
    timeouts: int
    mismatches: int
    error_messages: list[str]
    cm_pid: int | None  # the content manager measured (None: not found, see memory_note)
    cm_rss_idle: int | None  # bytes before the run
    cm_rss_peak: int | None
    cm_rss_end: int | None
    cm_pss_idle: int | None
    cm_pss_peak: int | None
    cm_pss_end: int | None
    shm_peak: int | None  # bytes the broker's device segments occupied in /dev/shm at the peak
    memory_note: str  # why memory is missing, or ""
    per_client: list[ClientSummary]

    def to_dict(self) -> dict:
        out = asdict(self)
        for c in out["per_client"]:
            c.pop("latencies")
        return out


def _percentile(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 3) if values else None


def check_config(config: FanoutConfig) -> None:
    """Bad values and an unreachable broker are UserErrors (one line), before anything starts."""
    if config.clients < 1:
        raise UserError(f"--clients must be at least 1, got {config.clients}")
    if config.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.timeout <= 0 or config.pace < 0 or config.stagger < 0 or config.n_prompts < 0:
        raise UserError("--timeout must be positive; --pace, --stagger and --n-prompts not negative")
    if not 0.0 <= config.threshold <= 1.0 or config.max_new_tokens < 1:
        raise UserError("--threshold must be in [0, 1] and --max-new-tokens at least 1")
    for address in (config.broker, config.upload or None):
        if address is not None and not address.startswith(("tcp://", "ipc://")):
            raise UserError(f"address {address!r} must start with tcp:// or ipc://")
    try:
        upload = config.edge.upload_address
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _reachable(config.broker, "the broker's request address")
    _reachable(upload, "the broker's upload address" + ("" if config.upload else ", derived: give --upload"))


def _reachable(address: str, what: str) -> None:
    if address.startswith("ipc://"):
        if not Path(address[len("ipc://"):]).exists():
            raise UserError(f"no broker at {address} ({what}; the socket file does not exist)")
        return
    host, _, port = address[len("tcp://"):].rpartition(":")
    if not port.isdigit() or not host or host == "*":
        raise UserError(f"address {address!r} is not tcp://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            pass
    except OSError as exc:
        raise UserError(f"no broker at {address} ({what}): {exc.strerror or exc}") from None


def read_prompt_texts(config: FanoutConfig) -> list[str]:
    from cecollm.edge.cli import read_prompts

    if isinstance(config.prompts, str):
        if not config.prompts:
            raise UserError("give prompts (--prompts FILE.jsonl)")
        if not Path(config.prompts).is_file():
            raise UserError(f"prompts file {config.prompts} does not exist")
        texts = read_prompts(None, config.prompts)
    else:
        texts = list(config.prompts)
    texts = texts[: config.n_prompts] if config.n_prompts else texts
    if not texts:
        raise UserError("no prompts")
    return texts


def _load_edge(config: FanoutConfig):
    """(loaded model, split, heads, prompt token ids) for live runs and recording."""
    from cecollm.cliutil import set_threads
    from cecollm.defaults import choose_split
    from cecollm.loading import load_model
    from cecollm.prompting import encode_prompt
    from cecollm.split import parse_exits

    texts = read_prompt_texts(config)
    set_threads(config.threads)
    loaded = load_model(config.model)
    split, heads = choose_split(loaded, parse_exits(config.exits) if config.exits else None,
                                config.upload_layer or None, config.heads or None)
    prompt_ids = [encode_prompt(loaded.tokenizer, t, config.raw) for t in texts]
    return loaded, split, heads, prompt_ids


def record_trace(config: FanoutConfig, path: str | Path | None = None,
                 progress: Callable[[int], None] | None = None) -> Trace:
    """Run one real edge (device `device_base`) over the prompts and write its trace to `path`
    (default config.trace); a generation with timeouts, re-uploads or fallbacks is refused."""
    from cecollm.bench.fanout_trace import TraceHeader, TracingClient, unclean

    check_config(config)
    path = path or config.trace
    if not path:
        raise UserError("give the trace file to write (--trace)")
    loaded, split, heads, prompt_ids = _load_edge(config)
    with TracingClient(loaded.model, loaded.identity, split, heads, config.edge, keep_rows=True) as client:
        for index, ids in enumerate(prompt_ids):
            result = client.generate_traced(index, ids)
            why = unclean(result)
            if why:
                raise UserError(f"recording prompt {index}: {why}; the trace would not be the cloud's work")
            if progress:
                progress(1)
        header = TraceHeader(str(config.model), loaded.identity, split.n_layers, tuple(split.exits),
                             split.upload_layer, "float16" if config.fp16 else "float32",
                             loaded.model.config.hidden_size, config.threshold, config.max_new_tokens, "")
        trace = client.trace(header)
    trace.save(path)
    return trace


def _order(count: int, client: int, rotate: bool) -> list[int]:
    first = client % count if rotate else 0
    return [*range(first, count), *range(first)]


def _run_live(config: FanoutConfig, summaries: list[ClientSummary], delays: list[float], stop: threading.Event,
              progress, user_errors: list[UserError]) -> list[threading.Thread]:
    """Threads that run one real EdgeClient each (one shared model); a UserError stops them all."""
    from cecollm.bench.fanout_trace import TracingClient
    from cecollm.edge.client import EdgeConfig

    loaded, split, heads, prompt_ids = _load_edge(config)

    def device(i: int) -> None:
        s = summaries[i]
        edge = EdgeConfig(**{**asdict(config.edge), "device_id": s.device_id})
        if stop.wait(delays[i]):
            return
        t0 = time.perf_counter()
        try:
            with TracingClient(loaded.model, loaded.identity, split, heads, edge) as client:
                for index in _order(len(prompt_ids), i, config.rotate):
                    if stop.is_set():
                        break
                    result = client.generate_traced(index, prompt_ids[index])
                    st = result.stats
                    s.generations += 1
                    s.cloud_tokens += st.cloud_tokens
                    s.edge_tokens += st.edge_tokens
                    s.timeouts += st.timeouts
                    s.outputs.append(list(result.token_ids))
                    if st.standalone_reason or st.reuploads:
                        s.error(f"prompt {index}: {st.standalone_reason or f'{st.reuploads} re-uploads'}")
                    if progress:
                        progress(1)
                s.latencies = client.recorder.latencies
                s.requests = len(s.latencies) + s.timeouts
                s.cloud_seconds = client.recorder.cloud_seconds
        except UserError as exc:
            user_errors.append(exc)
            stop.set()
        except Exception as exc:  # noqa: BLE001 (counted and reported, the other devices go on)
            log.exception("device %d failed", s.device_id)
            s.error(f"{exc.__class__.__name__}: {exc}")
        s.wall_seconds = time.perf_counter() - t0

    return [threading.Thread(target=device, args=(i,), name=f"fanout-{i}", daemon=True)
            for i in range(config.clients)]


def run_fanout(config: FanoutConfig, progress: Callable[[int], None] | None = None) -> FanoutReport:
    """Run `clients` devices at once against the broker; `progress(n)` after each generation."""
    check_config(config)
    rng = random.Random(config.seed)
    delays = [rng.uniform(0, config.stagger) if config.stagger else 0.0 for _ in range(config.clients)]
    summaries = [ClientSummary(config.device_base + i) for i in range(config.clients)]
    stop = threading.Event()
    user_errors: list[UserError] = []  # a device refused for the user's mistake (model/split mismatch)
    if config.mode == "replay":
        from cecollm.bench.fanout_replay import ReplayDevice
        from cecollm.bench.fanout_trace import Trace

        if not config.trace:
            raise UserError("replay needs a trace (--trace FILE; record one with --record)")
        trace = Trace.load(config.trace)
        threads = [threading.Thread(target=ReplayDevice(config, trace, summaries[i], stop, user_errors).run,
                                    args=(_order(len(trace.generations), i, config.rotate), delays[i], progress),
                                    name=f"fanout-{i}", daemon=True) for i in range(config.clients)]
    else:
        threads = _run_live(config, summaries, delays, stop, progress, user_errors)
    monitor, note = _monitor(config)
    t0 = time.perf_counter()
    try:
        if monitor:
            monitor.__enter__()
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join(config.timeout + 5)
        raise
    finally:
        if monitor:
            monitor.__exit__(None, None, None)
    wall = time.perf_counter() - t0
    if user_errors:
        raise user_errors[0]
    return _report(config, summaries, wall, monitor, note)


def _monitor(config: FanoutConfig):
    import psutil

    if config.cm_pid:
        try:
            return MemoryMonitor(psutil.Process(config.cm_pid), config.memory_interval), ""
        except psutil.NoSuchProcess:
            return None, f"no process {config.cm_pid}"
    proc = find_content_manager(config.edge.upload_address, config.broker_pid or None)
    if proc is None:
        where = f"broker {config.broker_pid}'s tree" if config.broker_pid else "this user's processes"
        return None, f"no process in {where} is bound to {config.edge.upload_address} (give --cm-pid)"
    return MemoryMonitor(proc, config.memory_interval), ""


def _report(config: FanoutConfig, summaries: list[ClientSummary], wall: float, monitor: MemoryMonitor | None,
            note: str) -> FanoutReport:
    latencies = [x for s in summaries for x in s.latencies]
    for s in summaries:
        s.latency_p50_ms, s.latency_p99_ms = _percentile(s.latencies, 50), _percentile(s.latencies, 99)
    samples = monitor.samples if monitor else []
    if monitor and monitor.error:
        note = monitor.error

    def mem(name: str, which: str):
        if not samples:
            return None
        return {"idle": getattr(samples[0], name), "end": getattr(samples[-1], name), "peak": monitor.peak(name)}[which]

    cloud_tokens = sum(s.cloud_tokens for s in summaries)
    return FanoutReport(
        mode=config.mode, clients=config.clients, generations=sum(s.generations for s in summaries),
        requests=sum(s.requests for s in summaries), cloud_tokens=cloud_tokens,
        edge_tokens=sum(s.edge_tokens for s in summaries),
        latency_p50_ms=_percentile(latencies, 50), latency_p99_ms=_percentile(latencies, 99),
        latency_mean_ms=round(1000 * float(np.mean(latencies)), 3) if latencies else None,
        latency_max_ms=round(1000 * max(latencies), 3) if latencies else None,
        cloud_tokens_per_s=round(cloud_tokens / wall, 3) if wall > 0 else 0.0,
        cloud_seconds=round(sum(s.cloud_seconds for s in summaries), 4), wall_seconds=round(wall, 4),
        errors=sum(s.errors for s in summaries), timeouts=sum(s.timeouts for s in summaries),
        mismatches=sum(s.mismatches for s in summaries),
        error_messages=[f"device {s.device_id}: {m}" for s in summaries for m in s.error_messages][:10],
        cm_pid=monitor.proc.pid if monitor else None,
        cm_rss_idle=mem("rss", "idle"), cm_rss_peak=mem("rss", "peak"), cm_rss_end=mem("rss", "end"),
        cm_pss_idle=mem("pss", "idle"), cm_pss_peak=mem("pss", "peak"), cm_pss_end=mem("pss", "end"),
        shm_peak=mem("shm", "peak"), memory_note=note, per_client=summaries)
