"""The scaling benchmark (issue 14): one recorded edge trace replayed from 1..32 devices against one broker,
batched (`--max-batch N`) and unbatched (`--max-batch 1`) in the same run.

Each mode has its broker, both up for the whole run, each with one worker (or `workers`) at one torch
thread; a point's batch sizes are the difference of the broker's batch-size histogram before and after it,
its memory the content manager's peak during it. Each point's devices have ids of their own (a broker keeps a
device id for its edge a while after its last request). The trace is recorded once, in the paper's mode
(threshold 0.8, exact=False), against the unbatched broker, or taken from a file; every replayed reply must
equal its recorded token (a mismatch is an error), which is also the check that batched serving is
token-identical. Points are run in pairs (unbatched then batched at each device count) so a run cut short
still has comparable pairs and slow drifts of the machine's load hit both modes alike.

`run_scaling(ScalingConfig(...)) -> (header, rows)`: one row per point, also appended to `<out>/raw.jsonl` as
it finishes; scaling_report.py turns the rows into the table, ratios, report.md and the plot.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from cecollm.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL, DEFAULT_THRESHOLD
from cecollm.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_DEVICES = (1, 2, 4, 8, 16, 32)
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "alpaca.jsonl"
BATCH_METRIC = "cecollm_broker_batch_size"  # histogram: requests per batch handed to a worker
LATENCY_METRIC = "cecollm_edge_request_latency_seconds"  # histogram by command: the broker's view of a request
DECIDE = {"command": "decide"}
MODES = ("unbatched", "batched")  # run in this order at each device count
RAW_NAME = "raw.jsonl"  # in <out>; the trace and the brokers' logs in <out>/raw/ (not committed: .gitignore)


@dataclass(frozen=True)
class ScalingConfig:
    """One scaling run; tools/scaling.py options take their defaults from here."""

    devices: tuple[int, ...] = DEFAULT_DEVICES  # device counts, one point per mode each
    max_batch: int = 0  # the batched mode's --max-batch; 0 = the largest device count
    workers: int = 1  # worker processes of the broker
    threads: int = 1  # torch threads of each worker (and of the recording edge)
    model: str = DEFAULT_MODEL
    exits: str = ""  # "" = the model's default split
    heads: str = ""  # "" = the model's default heads
    trace: str = ""  # an existing trace to replay; "" = record one into <out>/raw/trace.jsonl
    prompts: str | tuple[str, ...] = str(DEFAULT_PROMPTS)  # what the trace is recorded from
    n_prompts: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    threshold: float = DEFAULT_THRESHOLD  # the paper's mode: exits decide at this confidence
    duration: float = 30.0  # seconds each point replays (round the trace); 0 = each generation once per device
    pace: float = 1.0  # recorded edge time x this (1: the trace's request rate; 0: back to back)
    stagger: float = 1.0  # devices start at random offsets in [0, stagger) seconds
    timeout: float = 20.0  # seconds a request may take before it counts as a timeout
    seed: int = 0
    latency_target_ms: float = 100.0  # the p99 a device count must stay under to count as served
    out: str = "results/scaling"
    memory_interval: float = 0.1  # seconds between samples of the content manager's memory
    broker_args: tuple[str, ...] = ()  # more broker options, as given

    @property
    def batch(self) -> int:
        """The batched mode's --max-batch."""
        return self.max_batch or max(self.devices)


def check_scaling(config: ScalingConfig) -> None:
    """Bad values are UserErrors (one line), before anything starts."""
    if not config.devices or min(config.devices) < 1:
        raise UserError(f"--devices must be positive device counts, got {','.join(map(str, config.devices)) or 'none'}")
    if config.max_batch < 0 or config.workers < 1 or config.threads < 1:
        raise UserError("--max-batch must not be negative; --workers and --threads at least 1")
    if config.duration < 0 or config.pace < 0 or config.stagger < 0 or config.timeout <= 0:
        raise UserError("--duration, --pace and --stagger must not be negative, --timeout positive")
    if config.latency_target_ms <= 0:
        raise UserError("--latency-target-ms must be positive")
    if config.trace and not Path(config.trace).is_file():
        raise UserError(f"trace {config.trace} does not exist (leave --trace out to record one)")
    if not config.trace and isinstance(config.prompts, str) and not Path(config.prompts).is_file():
        raise UserError(f"prompts file {config.prompts} does not exist (give --prompts FILE.jsonl)")


def broker_has(option: str) -> bool:
    """Whether this checkout's `cecollm-broker` has `option` (--max-batch is being added): its click command's
    options, read in this process; its --help text if the module has no click command."""
    import click

    from cecollm.broker import cli

    commands = [c for c in vars(cli).values() if isinstance(c, click.Command)]
    if commands:
        return any(option in p.opts for c in commands for p in c.params)
    done = subprocess.run([sys.executable, "-m", "cecollm.broker", "--help"], capture_output=True, text=True,
                          timeout=120)
    return option in done.stdout


class ModeBroker:
    """The broker of one mode: `workers` workers at `threads` torch threads, metrics on a free port, and
    --max-batch when this broker has the option (else `max_batch_applied` is False: it batches as it does)."""

    def __init__(self, config: ScalingConfig, max_batch: int, has_max_batch: bool, keys_dir: Path, log_path: Path,
                 ports: list[int]):
        """`ports`: request, upload, worker and metrics port."""
        from cecollm.broker.launch import BrokerProcess

        port = ports[3]
        extra = ["--threads", str(config.threads), "--metrics", f"127.0.0.1:{port}", *config.broker_args]
        if config.exits:
            extra += ["--exits", config.exits]
        if config.heads:
            extra += ["--heads", config.heads]
        self.max_batch = max_batch
        self.max_batch_applied = has_max_batch
        if has_max_batch:
            extra += ["--max-batch", str(max_batch)]
        self.process = BrokerProcess(config.model, workers=config.workers, extra=extra, log_path=log_path,
                                     keys_dir=keys_dir, ports=tuple(ports[:3]))
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"

    def stop(self) -> None:
        self.process.stop()


def scrape(url: str) -> str:
    """A broker's metrics, as Prometheus text."""
    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.read().decode()


def parse_histogram(text: str, metric: str = BATCH_METRIC, where: dict[str, str] | None = None) -> dict | None:
    """The histogram `metric` in Prometheus text, its series whose labels include `where` summed: {"count", "sum",
    "buckets": {upper bound: observations in that bucket (not cumulative)}}; None when the text does not have it."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        cumulative: dict[float, float] = {}
        count = total = 0.0
        for s in family.samples:
            if any(s.labels.get(k) != v for k, v in (where or {}).items()):
                continue
            if s.name == metric + "_bucket":
                le = float(s.labels["le"])
                cumulative[le] = cumulative.get(le, 0.0) + s.value
            elif s.name == metric + "_count":
                count += s.value
            elif s.name == metric + "_sum":
                total += s.value
        buckets, below = {}, 0.0
        for le in sorted(cumulative):
            buckets[le] = int(cumulative[le] - below)
            below = cumulative[le]
        return {"count": int(count), "sum": total, "buckets": buckets}
    return None


def broker_latency(histogram: dict | None) -> dict:
    """The broker's own view of the DECIDE latency (arrival to reply, without the edge's hops): its mean and the
    upper bound of the bucket that holds the 99th percentile, in ms (None without the metric or requests)."""
    if histogram is None or not histogram["count"]:
        return {"broker_latency_mean_ms": None, "broker_latency_p99_le_ms": None}
    seen, p99 = 0, None
    for le in sorted(histogram["buckets"]):
        seen += histogram["buckets"][le]
        if seen >= 0.99 * histogram["count"]:
            p99 = le
            break
    return {"broker_latency_mean_ms": round(1000 * histogram["sum"] / histogram["count"], 3),
            "broker_latency_p99_le_ms": None if p99 in (None, float("inf")) else round(1000 * p99, 3)}


def batch_stats(histogram: dict | None) -> dict:
    """Mean, max (the upper bound of the highest bucket with a batch in it) and the non-empty buckets."""
    if histogram is None or not histogram["count"]:
        return {"batch_mean": None, "batch_max": None, "batch_histogram": None, "batches": 0 if histogram else None}
    seen = {le: n for le, n in histogram["buckets"].items() if n}
    top = max(seen)
    return {"batch_mean": round(histogram["sum"] / histogram["count"], 3),
            "batch_max": None if top == float("inf") else int(top) if top == int(top) else top,
            "batch_histogram": {("+Inf" if le == float("inf") else f"{le:g}"): n for le, n in seen.items()},
            "batches": histogram["count"]}


def fanout_config(config: ScalingConfig, broker, trace: str, clients: int = 1, **options):
    """The FanoutConfig of a point (or of the recording: clients 1 and the prompts)."""
    from cecollm.loadgen.config import FanoutConfig

    return FanoutConfig(clients=clients, broker=broker.request_address, upload=broker.upload_address,
                        model=config.model, heads=config.heads, exits=config.exits, threshold=config.threshold,
                        max_new_tokens=config.max_new_tokens, timeout=config.timeout, pace=config.pace,
                        stagger=config.stagger, duration=config.duration, seed=config.seed, trace=trace,
                        broker_pid=broker.proc.pid, cm_pid=broker.content_manager_pid(),
                        memory_interval=config.memory_interval, threads=config.threads, keys=broker.device_keys,
                        **options)


def trace_rate(trace) -> dict:
    """The trace's own pace: cloud requests per second of one device, over the recorded generations' time."""
    seconds = sum(g.events[-1].t for g in trace.generations if g.events)
    requests = sum(len(g.decides) for g in trace.generations)
    return {**trace.summary(), "seconds": round(seconds, 3),
            "requests_per_s_per_device": round(requests / seconds, 3) if seconds else None}


POINT_FIELDS = ("generations", "requests", "cloud_tokens", "cloud_tokens_per_s", "latency_p50_ms", "latency_p99_ms",
                "latency_mean_ms", "latency_max_ms", "cloud_seconds", "wall_seconds", "errors", "timeouts",
                "mismatches", "reuploads", "cm_rss_idle", "cm_rss_peak", "cm_pss_peak", "shm_peak", "memory_note",
                "error_messages")


def histogram_delta(after: dict | None, before: dict | None) -> dict | None:
    """What a histogram counted between two scrapes of the same broker."""
    if after is None or before is None:
        return after
    return {"count": after["count"] - before["count"], "sum": after["sum"] - before["sum"],
            "buckets": {le: n - before["buckets"].get(le, 0) for le, n in after["buckets"].items()}}


def run_point(config: ScalingConfig, broker: ModeBroker, trace: str, mode: str, devices: int, device_base: int,
              progress: Callable[[int], None] | None = None) -> dict:
    """One point: `devices` devices (ids from `device_base`) replaying `trace` against the mode's broker; the row
    (POINT_FIELDS, batch_stats and the settings)."""
    from cecollm.loadgen.fanout import run_fanout

    began = time.perf_counter()
    load = os.getloadavg()[0]  # other work on the machine shows as latency: noted next to it
    before = scrape(broker.metrics_url)
    report = run_fanout(fanout_config(config, broker.process, trace, clients=devices, mode="replay",
                                      device_base=device_base), progress)
    after = scrape(broker.metrics_url)  # the point's part of the histograms: after - before
    batches = histogram_delta(parse_histogram(after), parse_histogram(before))
    latency = histogram_delta(parse_histogram(after, LATENCY_METRIC, DECIDE),
                              parse_histogram(before, LATENCY_METRIC, DECIDE))
    d = report.to_dict()
    return {"mode": mode, "devices": devices, "max_batch": broker.max_batch, "max_batch_applied": broker.max_batch_applied,
            "workers": config.workers, "threads": config.threads, "pace": config.pace, "duration": config.duration,
            **{k: d[k] for k in POINT_FIELDS}, **batch_stats(batches), **broker_latency(latency),
            "load_1min": round(load, 2), "seconds_spent": round(time.perf_counter() - began, 2)}


def record(config: ScalingConfig, broker: ModeBroker, progress=None) -> str:
    """Record the trace once, against the unbatched broker (the reference the batched replies must equal), as
    device 1000."""
    from cecollm.loadgen.live import record_trace

    path = Path(config.out) / "raw" / "trace.jsonl"
    record_trace(fanout_config(config, broker.process, str(path), prompts=config.prompts, n_prompts=config.n_prompts),
                 progress=progress)
    return str(path)


def run_scaling(config: ScalingConfig, on_point: Callable[[dict], None] | None = None,
                progress_for: Callable[[str, int], Callable[[int], None] | None] | None = None) -> tuple[dict, list[dict]]:
    """Start both brokers, record (or load) the trace, then run every point; (the run's header, the rows). Each
    row is appended to <out>/raw.jsonl (after a header line) as it finishes and handed to `on_point`.
    `progress_for(what, total)` gives a callback for each step's units (generations; total 0 when unknown)."""
    from cecollm.loadgen.trace import Trace

    check_scaling(config)
    out = Path(config.out)
    (out / "raw" / "logs").mkdir(parents=True, exist_ok=True)
    has_max_batch = broker_has("--max-batch")
    if config.trace:
        Trace.load(config.trace)  # a bad trace is a UserError now, not after the brokers started
    keys_dir = Path(tempfile.mkdtemp(prefix="cecollm-scaling-keys-"))  # this run's keys: removed at its end
    try:
        return _run(config, has_max_batch, keys_dir, on_point, progress_for)
    finally:
        shutil.rmtree(keys_dir, ignore_errors=True)


def _run(config: ScalingConfig, has_max_batch: bool, keys_dir: Path, on_point, progress_for) -> tuple[dict, list[dict]]:
    from cecollm.loadgen.trace import Trace

    out = Path(config.out)
    done = threading.Event()
    brokers, keepers = _start(config, has_max_batch, keys_dir, done)
    try:
        trace_path = config.trace
        if not trace_path:
            n = len(config.prompts[:config.n_prompts or None]) if isinstance(config.prompts, tuple) else config.n_prompts
            trace_path = record(config, brokers["unbatched"], progress_for("record", n) if progress_for else None)
        trace = Trace.load(trace_path)
        header = {"kind": "run", "config": asdict(config), "trace_path": trace_path, "trace": trace_rate(trace),
                  "max_batch_option": has_max_batch,
                  "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        raw = out / RAW_NAME
        raw.write_bytes(orjson.dumps(header) + b"\n")
        rows = []
        step = 1000 * (max(config.devices) // 1000 + 1)  # device ids of their own per point: 1000 recorded
        for devices in config.devices:
            for mode in MODES:
                total = 0 if config.duration else len(trace.generations) * devices
                progress = progress_for(f"{mode} x{devices}", total) if progress_for else None
                base = 1000 + step * (len(rows) + 1)
                try:
                    row = run_point(config, brokers[mode], trace_path, mode, devices, base, progress)
                except UserError:
                    raise
                except Exception as exc:  # noqa: BLE001 (a broker that died: the point says so, the run goes on)
                    log.exception("scaling point %s x%d failed", mode, devices)
                    row = {"mode": mode, "devices": devices, "failed": f"{exc.__class__.__name__}: {exc}"}
                rows.append(row)
                with raw.open("ab") as f:
                    f.write(orjson.dumps({"kind": "point", **row}) + b"\n")
                if on_point:
                    on_point(row)
    finally:
        done.set()  # each keeper stops its broker
        for keeper in keepers:
            keeper.join()
    return header, rows


class _Keeper(threading.Thread):
    """Starts a mode's broker and lives until `done`, then stops it: a broker dies with the thread that started
    it (PR_SET_PDEATHSIG), so the thread that starts it stays; two keepers start both brokers at once."""

    def __init__(self, make: Callable[[], ModeBroker], done: threading.Event) -> None:
        super().__init__(name="scaling-broker", daemon=True)
        self.make, self.done = make, done
        self.started_broker = threading.Event()
        self.broker: ModeBroker | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.broker = self.make()
        except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread)
            self.error = exc
        self.started_broker.set()
        if self.broker is not None:
            self.done.wait()
            self.broker.stop()


def _start(config: ScalingConfig, has_max_batch: bool, keys_dir: Path, done: threading.Event) -> tuple[dict, list]:
    """Both modes' brokers, started at once: ({mode: ModeBroker}, keepers to join after setting `done`); the
    first start's error is raised after both ended (and the one that started is stopped)."""
    from cecollm.runtime import free_ports
    from cecollm.wire.security import launcher_keys

    launcher_keys(keys_dir)  # made once here, not by two brokers at once
    ports = free_ports(4 * len(MODES))  # taken together: two brokers never get the same port

    def maker(k: int, mode: str):
        return lambda: ModeBroker(config, config.batch if mode == "batched" else 1, has_max_batch, keys_dir,
                                  Path(config.out) / "raw" / "logs" / f"broker-{mode}.log", ports[4 * k:4 * k + 4])

    keepers = {mode: _Keeper(maker(k, mode), done) for k, mode in enumerate(MODES)}
    for keeper in keepers.values():
        keeper.start()
    for keeper in keepers.values():
        keeper.started_broker.wait()
    errors = [k.error for k in keepers.values() if k.error is not None]
    if errors:
        done.set()
        for keeper in keepers.values():
            keeper.join()
        raise errors[0]
    return {mode: k.broker for mode, k in keepers.items()}, list(keepers.values())


def load_raw(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, rows) of a raw.jsonl written by run_scaling."""
    try:
        lines = [orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]
    except (OSError, orjson.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not lines or lines[0].get("kind") != "run":
        raise UserError(f"{path} is not a scaling run's raw file")
    rows = [{k: v for k, v in line.items() if k != "kind"} for line in lines[1:] if line.get("kind") == "point"]
    return lines[0], rows
