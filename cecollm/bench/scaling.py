"""Multi-device scaling (the paper's scaling figure): 1..K devices against one cloud.

CE-CoLLM at 0.8: the load generator's fanout (`cecollm.loadgen.fanout.run_fanout`) in replay mode, from a
trace recorded by one real edge on the same prompts (through the same link); the cloud does its
real work for K devices while the edge side sleeps its recorded compute time.
Cloud-based: K threads, each a CloudBasedEdge generating the same prompts at once against the
stateless baseline cloud (one process, one core: requests queue).
Each (dataset, kind, devices) result is a line of raw/scaling.jsonl; reruns skip finished ones.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from cecollm.bench.config import SPEED_DATASETS, BenchConfig

log = logging.getLogger(__name__)
KINDS = ("ce-0.8", "cloud")


def _raw(out: Path) -> Path:
    return out / "raw" / "scaling.jsonl"


def load_scaling(out: Path) -> dict[tuple[str, str, int], dict]:
    found = {}
    path = _raw(out)
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                found[(rec["dataset"], rec["kind"], int(rec["devices"]))] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("%s: unreadable line skipped", path)
    return found


def scaling_todo(config: BenchConfig) -> list[tuple[str, str, int]]:
    done = load_scaling(Path(config.out_dir))
    kinds = [k for k in KINDS if k in config.strategies]
    return [(d, k, n) for d in config.datasets if d in SPEED_DATASETS for k in kinds for n in config.scaling
            if (d, k, n) not in done]


def run_scaling(config: BenchConfig, cloud, prompts: dict, progress: bool = True) -> None:
    """Run every missing scaling point while the cloud side is up."""
    out = Path(config.out_dir)
    todo = scaling_todo(config)
    for dataset, kind, devices in todo:
        picked = prompts.get(dataset, [])
        if not picked:
            continue
        log.info("scaling: %s, %s, %d devices", dataset, kind, devices)
        t0 = time.perf_counter()
        try:
            if kind == "cloud":
                row = _cloud_based(config, cloud, [ids for _, ids in picked], devices)
            else:
                row = _fanout(config, cloud, dataset, [p.text for p, _ in picked], devices, out)
        except Exception as exc:  # the scaling section is reported as failed, the tables still get written
            log.exception("scaling %s %s %d failed", dataset, kind, devices)
            row = {"error": f"{type(exc).__name__}: {exc}"}
        row.update(dataset=dataset, kind=kind, devices=devices, seconds_spent=time.perf_counter() - t0)
        _raw(out).parent.mkdir(parents=True, exist_ok=True)
        with _raw(out).open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")


def _cloud_based(config: BenchConfig, cloud, prompt_ids: list[list[int]], devices: int) -> dict:
    import zmq

    from cecollm.bench.baselines.edge import CloudBasedEdge

    context = zmq.Context()
    edges = [CloudBasedEdge(cloud.addresses.baseline, config.max_new_tokens, config.timeout * devices, context,
                            cloud.device_keys) for _ in range(devices)]
    results: list[list] = [[] for _ in range(devices)]
    errors: list[str] = []

    def device(i: int) -> None:
        order = prompt_ids[i % len(prompt_ids):] + prompt_ids[: i % len(prompt_ids)]  # not in lockstep
        try:
            for ids in order:
                results[i].append(edges[i].generate(ids).stats)
        except Exception as exc:
            errors.append(f"device {i}: {exc}")

    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(devices)]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for e in edges:
            e.close()
        context.term()
    wall = time.perf_counter() - t0
    stats = [s for r in results for s in r]
    return {"wall_seconds": wall, "generations": len(stats), "cloud_seconds": sum(s.cloud_seconds for s in stats),
            "comm_seconds": sum(s.comm_seconds for s in stats), "cloud_tokens": sum(s.cloud_tokens for s in stats),
            "errors": len(errors), "error_messages": errors[:5]}


def _fanout(config: BenchConfig, cloud, dataset: str, texts: list[str], devices: int, out: Path) -> dict:
    from cecollm.loadgen.config import FanoutConfig
    from cecollm.loadgen.fanout import run_fanout
    from cecollm.loadgen.live import record_trace

    a = cloud.addresses
    trace = out / "raw" / f"trace-{dataset}.json"
    common = dict(broker=a.broker, upload=a.upload, model=config.model, heads=config.heads, exits=config.exits,
                  threshold=0.8, fp16=True, max_new_tokens=config.max_new_tokens, timeout=config.timeout,
                  threads=config.threads, trace=str(trace), broker_pid=cloud.broker.proc.pid,
                  cm_pid=cloud.content_manager_pid(), keys=cloud.device_bundle)
    if not trace.is_file():
        log.info("scaling: recording a trace of %d %s prompts (one real edge)", len(texts), dataset)
        record_trace(FanoutConfig(prompts=tuple(texts), **common))
    report = run_fanout(FanoutConfig(clients=devices, mode="replay", **common))
    keep = ("generations", "requests", "cloud_tokens", "edge_tokens", "latency_p50_ms", "latency_p99_ms",
            "cloud_tokens_per_s", "cloud_seconds", "wall_seconds", "errors", "timeouts", "mismatches",
            "cm_rss_peak", "shm_peak", "memory_note")
    d = report.to_dict()
    return {k: d.get(k) for k in keep} | {"error_messages": d.get("error_messages", [])[:5]}


def run_scaling_section(config: BenchConfig, out: Path) -> dict:
    """The scaling rows on file for this run's datasets and device counts, and what is missing and why."""
    if not config.scaling:
        return {"status": "skipped (--scaling none)", "rows": []}
    done = load_scaling(out)
    rows = [done[k] for k in sorted(done) if k[0] in config.datasets and k[2] in config.scaling
            and k[1] in config.strategies]
    missing = scaling_todo(config)
    notes = []
    if missing:
        notes.append(f"missing points: {', '.join(f'{d}/{k}/{n}' for d, k, n in missing)}")
    failed = [r for r in rows if r.get("error")]
    if failed:
        notes.append(f"{len(failed)} points failed: " + "; ".join(f"{r['dataset']}/{r['kind']}/{r['devices']}: "
                                                                     f"{r['error']}" for r in failed[:3]))
    return {"status": "; ".join(notes) or "complete", "rows": rows}
