"""The scaling benchmark (tools/scaling.py, cecollm.loadgen.scaling): a short run on the tiny model with 1 and 2
devices, batched and unbatched, every reply equal to the recorded trace; the batch-size histogram read from
Prometheus text; the report's ratios and served counts; bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import orjson
import pytest
import torch
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from cecollm.loadgen.scaling import (
    DECIDE,
    LATENCY_METRIC,
    MODES,
    RAW_NAME,
    ScalingConfig,
    batch_stats,
    broker_has,
    broker_latency,
    histogram_delta,
    load_raw,
    parse_histogram,
    run_scaling,
)
from cecollm.loadgen.scaling_report import ratios, served, summary, write_report
from cecollm.loadgen.trace import Trace

TOOL = Path(__file__).resolve().parents[1] / "tools" / "scaling.py"
PROMPTS = ("Tell me a story about a cat.", "The capital of France is")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """A whole run: the trace recorded once, then 1 and 2 devices in both modes, each generation once."""
    out = tmp_path_factory.mktemp("scaling")
    config = ScalingConfig(devices=(1, 2), model=str(model_dir), exits="2,4", prompts=PROMPTS, n_prompts=2,
                           max_new_tokens=8, duration=0.0, stagger=0.0, timeout=20.0, out=str(out),
                           memory_interval=0.005)
    seen: list[dict] = []
    header, rows = run_scaling(config, on_point=seen.append)
    return config, header, rows, seen, out


def test_every_point_gets_the_recorded_tokens_and_reports_its_fields(run):
    config, header, rows, seen, out = run
    trace = Trace.load(header["trace_path"])
    decides = sum(len(g.decides) for g in trace.generations)
    assert decides > 0 and header["trace"]["cloud_requests"] == decides
    assert [(r["devices"], r["mode"]) for r in rows] == [(n, m) for n in (1, 2) for m in MODES]
    assert seen == rows  # each point handed over as it finished
    has_option = broker_has("--max-batch")
    assert header["max_batch_option"] is has_option
    for r in rows:
        assert "failed" not in r, r
        assert (r["errors"], r["timeouts"], r["mismatches"]) == (0, 0, 0), r["error_messages"]
        # every device replayed every generation: each cloud request answered, with the recorded token
        assert r["generations"] == r["devices"] * len(trace.generations)
        assert r["requests"] == r["cloud_tokens"] == r["devices"] * decides
        assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"]
        assert r["cloud_tokens_per_s"] == pytest.approx(r["cloud_tokens"] / r["wall_seconds"], rel=1e-2)
        assert r["max_batch"] == (2 if r["mode"] == "batched" else 1)  # 0 = the largest device count
        assert r["max_batch_applied"] is has_option and (r["workers"], r["threads"]) == (1, 1)
        assert 0 < r["cm_rss_idle"] <= r["cm_rss_peak"] and r["memory_note"] == ""
        # the broker's view of each request lies inside the device's: its mean cannot be larger
        assert 0 < r["broker_latency_mean_ms"] <= r["latency_mean_ms"]
        if r["batches"] is None:  # the broker exports no batch histogram (yet): n/a everywhere
            assert r["batch_mean"] is r["batch_max"] is r["batch_histogram"] is None
        else:  # every request went to a worker in some batch, none larger than --max-batch
            assert r["batches"] >= 1 and sum(r["batch_histogram"].values()) == r["batches"]
            assert 1 <= r["batch_mean"] <= r["batch_max"] <= r["max_batch"]
            if r["mode"] == "unbatched" and has_option:  # --max-batch 1 reached the broker: batches of one
                assert r["batch_histogram"] == {"1": r["batches"]} and r["batch_mean"] == 1
    header2, rows2 = load_raw(out / RAW_NAME)
    assert rows2 == orjson.loads(orjson.dumps(rows)) and header2["trace_path"] == header["trace_path"]


def test_the_report_has_the_table_ratios_and_the_served_line(run):
    config, header, rows, _, out = run
    report, text = write_report(Path(out), header, rows)
    assert report.read_text() == text
    table = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(table) == 4 + 2  # a line per point, a ratio line per device count
    assert "largest device count whose p99 stays under 100 ms" in text
    assert "Errors 0 (mismatches 0), timeouts 0, failed points 0" in text
    s = summary(header, rows)
    assert [r["devices"] for r in s["ratios"]] == [1, 2] and all(r["tokens_per_s"] > 0 for r in s["ratios"])
    assert set(s["served"]) == {"unbatched", "batched"}
    assert (out / "scaling.png").stat().st_size > 0 and "![scaling](scaling.png)" in text
    if not header["max_batch_option"]:
        assert "no --max-batch option" in text


def _row(mode: str, devices: int, p99: float, tokens: float, errors: int = 0) -> dict:
    return {"mode": mode, "devices": devices, "latency_p99_ms": p99, "cloud_tokens_per_s": tokens, "errors": errors,
            "timeouts": 0, "mismatches": 0}


def test_served_is_the_largest_count_before_the_first_miss_and_ratios_pair_the_modes():
    rows = [_row("unbatched", 1, 20, 10), _row("unbatched", 2, 60, 19), _row("unbatched", 4, 140, 22),
            _row("unbatched", 8, 90, 22),  # under the target again, but 4 was not: not served
            _row("batched", 1, 21, 10), _row("batched", 2, 30, 20), _row("batched", 4, 50, 40),
            _row("batched", 8, 80, 66, errors=1)]  # an error: not served
    assert served(rows, "unbatched", 100.0) == (2, False)
    assert served(rows, "batched", 100.0) == (4, False)
    assert served(rows, "batched", 10.0) == (0, False)
    assert served(rows[4:7], "batched", 100.0) == (4, True)
    by = {r["devices"]: r for r in ratios(rows)}
    assert by[4] == {"devices": 4, "tokens_per_s": pytest.approx(40 / 22, abs=1e-3), "p99": pytest.approx(50 / 140,
                                                                                                     abs=1e-3)}
    assert ratios([*rows[:1], {"mode": "batched", "devices": 1, "failed": "no broker"}])[0]["p99"] is None


def test_batch_sizes_come_from_the_prometheus_histogram():
    registry = CollectorRegistry()
    h = Histogram("cecollm_broker_batch_size", "requests per batch", buckets=(1, 2, 4, 8, 16, 32), registry=registry)
    for size in (1, 1, 3, 3, 3, 7):
        h.observe(size)
    parsed = parse_histogram(generate_latest(registry).decode())
    assert parsed["count"] == 6 and parsed["sum"] == 18
    assert {le: n for le, n in parsed["buckets"].items() if n} == {1.0: 2, 4.0: 3, 8.0: 1}
    stats = batch_stats(parsed)
    assert stats == {"batch_mean": 3.0, "batch_max": 8, "batch_histogram": {"1": 2, "4": 3, "8": 1}, "batches": 6}
    assert parse_histogram("# nothing here\n") is None
    assert batch_stats(None)["batch_mean"] is None and batch_stats(None)["batches"] is None
    # a point's batches: what the broker counted since the scrape before it
    before = parsed
    for size in (2, 2, 30):
        h.observe(size)
    delta = histogram_delta(parse_histogram(generate_latest(registry).decode()), before)
    assert batch_stats(delta) == {"batch_mean": 11.333, "batch_max": 32, "batch_histogram": {"2": 2, "32": 1},
                                  "batches": 3}
    assert histogram_delta(None, before) is None


def test_the_brokers_decide_latency_comes_from_its_histogram_by_command():
    registry = CollectorRegistry()
    h = Histogram("cecollm_edge_request_latency_seconds", "latency", ["command"], buckets=(0.001, 0.01, 0.1, 1.0),
                  registry=registry)
    for seconds in [0.002] * 98 + [0.05, 0.5]:
        h.labels("decide").observe(seconds)
    h.labels("hello").observe(0.9)  # another command: not counted
    parsed = parse_histogram(generate_latest(registry).decode(), LATENCY_METRIC, DECIDE)
    assert parsed["count"] == 100
    stats = broker_latency(parsed)
    assert stats["broker_latency_p99_le_ms"] == 100.0  # the 99th of 100 lies in the (10 ms, 100 ms] bucket
    assert stats["broker_latency_mean_ms"] == pytest.approx(1000 * (0.002 * 98 + 0.55) / 100, abs=1e-3)
    assert broker_latency(None) == {"broker_latency_mean_ms": None, "broker_latency_p99_le_ms": None}


def test_the_tool_prints_the_report_again_from_a_raw_file_and_exits_1_on_a_mismatch(run, tmp_path):
    _, header, rows, _, _ = run
    raw = tmp_path / RAW_NAME
    raw.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in [header, *({"kind": "point", **r} for r in rows)]))
    r = CliRunner().invoke(_tool_main(), ["--from-raw", str(raw)])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("# Scaling") and (tmp_path / "report.md").read_text().strip() == r.stdout.strip()
    bad = [{**rows[-1], "errors": 1, "mismatches": 1}]  # one reply that differed from the recorded token
    raw.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in [header, *({"kind": "point", **r} for r in bad)]))
    r = CliRunner().invoke(_tool_main(), ["--from-raw", str(raw)])
    assert r.exit_code == 1 and "Errors 1 (mismatches 1)" in r.stdout
    assert f"points with problems: batched x{bad[0]['devices']}: 1 errors (1 mismatches)" in r.stdout


def _tool_main():
    spec = importlib.util.spec_from_file_location("scaling_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(("args", "expected"), [
    (["--devices", "0,2"], "--devices must be positive"),
    (["--devices", "1,x"], "--devices must be device counts"),
    (["--trace", "/nonexistent/t.jsonl"], "does not exist"),
    (["--prompts", "/nonexistent/p.jsonl"], "prompts file /nonexistent/p.jsonl does not exist"),
    (["--workers", "0"], "--workers and --threads at least 1"),
    (["--from-raw", "/nonexistent/raw.jsonl"], "cannot read"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path):
    r = CliRunner().invoke(_tool_main(), [*args, "--out", str(tmp_path)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.stderr
