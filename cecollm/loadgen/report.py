"""What a fanout run measured: per device and together (latency, tokens, errors, the content manager's memory)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from cecollm.loadgen.config import FanoutConfig
from cecollm.loadgen.memory import MemoryMonitor


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
    reuploads: int = 0  # sessions reopened and uploaded again after the cloud lost the state
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
    reuploads: int  # sessions reopened after the cloud lost them (a restarted content manager, evictions)
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


def build_report(config: FanoutConfig, summaries: list[ClientSummary], wall: float, monitor: MemoryMonitor | None,
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
        mismatches=sum(s.mismatches for s in summaries), reuploads=sum(s.reuploads for s in summaries),
        error_messages=[f"device {s.device_id}: {m}" for s in summaries for m in s.error_messages][:10],
        cm_pid=monitor.proc.pid if monitor else None,
        cm_rss_idle=mem("rss", "idle"), cm_rss_peak=mem("rss", "peak"), cm_rss_end=mem("rss", "end"),
        cm_pss_idle=mem("pss", "idle"), cm_pss_peak=mem("pss", "peak"), cm_pss_end=mem("pss", "end"),
        shm_peak=mem("shm", "peak"), memory_note=note, per_client=summaries)
