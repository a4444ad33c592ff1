"""Fanout on loopback: record a trace from a real edge, replay it as several devices, live devices, CLI errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import orjson
import psutil
import pytest
import torch
from click.testing import CliRunner

from cecollm.broker.launch import BrokerProcess
from cecollm.loadgen.config import FanoutConfig
from cecollm.loadgen.fanout import run_fanout
from cecollm.loadgen.live import record_trace
from cecollm.loadgen.trace import Trace
from cecollm.loading import load_model
from cecollm.prompting import encode_prompt
from cecollm.runtime import free_ports

from conftest import hf_greedy

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fanout.py"
PROMPTS = ["Tell me a story about a cat.", "The capital of France is", "Edge devices run the first layers."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"prompt": p}) + b"\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def broker(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "broker.log"
    with BrokerProcess(str(model_dir), workers=1, extra=["--exits", "2,4"], log_path=log) as b:
        yield b


def _config(broker, model_dir, prompts_file, **options) -> FanoutConfig:
    return FanoutConfig(**{"broker": broker.request_address, "upload": broker.upload_address, "model": str(model_dir),
                           "exits": "2,4", "prompts": str(prompts_file), "max_new_tokens": 10, "timeout": 20.0,
                           "broker_pid": broker.proc.pid, "keys": broker.device_keys, **options})


@pytest.fixture(scope="module")
def trace_path(broker, model_dir, prompts_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "edge.jsonl"
    record_trace(_config(broker, model_dir, prompts_file, threshold=0.8, trace=str(path)))
    return path


def test_a_recorded_trace_holds_every_row_and_the_clouds_tokens(trace_path):
    trace = Trace.load(trace_path)
    assert trace_path.with_name(trace_path.name + ".rows.npy").is_file()
    assert trace.header.wire_dtype == "float16" and trace.rows.dtype.name == "float16"
    assert len(trace.generations) == len(PROMPTS)
    row = 0
    for g in trace.generations:
        uploads = [e for e in g.events if e.kind == "upload"]
        # each position's upload-layer row exactly once: prompt and all but the last token
        assert sum(e.rows for e in uploads) == g.prompt_tokens + len(g.token_ids) - 1
        assert [e.start for e in uploads] == sorted(e.start for e in uploads) and uploads[0].start == 0
        offsets = [row + sum(u.rows for u in uploads[:k]) for k in range(len(uploads))]
        assert [e.row for e in uploads] == offsets  # rows stored in upload order
        row += sum(e.rows for e in uploads)
        cloud = [t for t, by in zip(g.token_ids, g.decided_by) if by == "cloud"]
        assert [e.token for e in g.decides] == cloud and cloud
        assert [e.kind for e in g.events][0] == "hello" and g.events[-1].kind == "end"
        assert all(e.gap >= 0 and e.t >= 0 for e in g.events)
        assert sum(e.gap for e in uploads) > 0  # the edge's compute was recorded
    assert row == len(trace.rows)


def test_three_devices_replay_the_trace_and_get_its_tokens(broker, model_dir, prompts_file, trace_path):
    trace = Trace.load(trace_path)
    # segments live only while a generation runs (tens of ms on the tiny model): sample often enough to see them
    report = run_fanout(_config(broker, model_dir, prompts_file, clients=3, mode="replay", trace=str(trace_path),
                                memory_interval=0.005))
    decides = sum(len(g.decides) for g in trace.generations)
    assert (report.errors, report.timeouts, report.mismatches) == (0, 0, 0), report.error_messages
    assert report.generations == 3 * len(PROMPTS)
    assert report.requests == report.cloud_tokens == 3 * decides
    assert [c.device_id for c in report.per_client] == [1000, 1001, 1002]
    for i, c in enumerate(report.per_client):
        order = [*range(i % 3, 3), *range(i % 3)]  # rotated: devices do not move in lockstep
        assert c.outputs == [[e.token for e in trace.generations[k].decides] for k in order]
        assert c.requests == decides and 0 < c.latency_p50_ms <= c.latency_p99_ms
    assert 0 < report.latency_p50_ms <= report.latency_p99_ms <= report.latency_max_ms
    assert report.cloud_tokens_per_s == pytest.approx(report.cloud_tokens / report.wall_seconds, rel=1e-3)
    assert 0 < report.cloud_seconds < report.wall_seconds
    # the edge's recorded compute was slept, so the run takes at least that long
    assert report.wall_seconds >= trace.summary()["edge_seconds"] * 0.9
    cm = psutil.Process(report.cm_pid)
    assert cm.ppid() == broker.proc.pid and report.memory_note == ""
    assert 0 < report.cm_rss_idle <= report.cm_rss_peak and 0 < report.cm_pss_peak <= report.cm_rss_peak
    assert report.shm_peak > 0  # device segments existed during the run
    out = orjson.loads(orjson.dumps(report.to_dict()))
    assert out["per_client"][0]["outputs"] == report.per_client[0].outputs and "latencies" not in out["per_client"][0]


def test_a_reply_that_differs_from_the_trace_is_an_error(broker, model_dir, prompts_file, trace_path, tmp_path):
    lines = trace_path.read_bytes().splitlines()
    k = next(i for i, line in enumerate(lines) if orjson.loads(line)["kind"] == "decide")
    event = orjson.loads(lines[k])
    lines[k] = orjson.dumps({**event, "token": event["token"] + 1})
    bad = tmp_path / "bad.jsonl"
    bad.with_name("bad.jsonl.rows.npy").write_bytes(trace_path.with_name(trace_path.name + ".rows.npy").read_bytes())
    header = orjson.loads(lines[0])
    lines[0] = orjson.dumps({**header, "rows_file": "bad.jsonl.rows.npy"})
    bad.write_bytes(b"\n".join(lines) + b"\n")
    report = run_fanout(_config(broker, model_dir, prompts_file, clients=1, trace=str(bad), pace=0.0, rotate=False))
    assert (report.mismatches, report.errors, report.timeouts) == (1, 1, 0)
    assert f"the trace has {event['token'] + 1}" in report.error_messages[0]


def test_two_live_devices_match_transformers(broker, model_dir, prompts_file):
    report = run_fanout(_config(broker, model_dir, prompts_file, clients=2, mode="live", threshold=1.0, fp16=False,
                                rotate=False, n_prompts=2))
    assert (report.errors, report.timeouts) == (0, 0), report.error_messages
    loaded = load_model(str(model_dir))
    expected = [hf_greedy(loaded.model, encode_prompt(loaded.tokenizer, p), 10) for p in PROMPTS[:2]]
    for c in report.per_client:
        assert c.outputs == expected
        assert c.cloud_tokens == 20 and c.edge_tokens == 0 and c.requests == 20
    assert report.requests == 40 and report.latency_p50_ms > 0 and report.cm_pid is not None


def _tool_main():
    spec = importlib.util.spec_from_file_location("fanout_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bad_input_is_one_line_and_exit_2(broker, prompts_file, tmp_path):
    dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    cases = {
        "does not exist": ["--broker", broker.request_address, "--upload", broker.upload_address, "--mode", "live",
                           "--keys", broker.device_keys, "--prompts", str(tmp_path / "missing.jsonl")],
        "at least 1": ["--broker", broker.request_address, "--clients", "0", "--trace", "x"],
        "must start with": ["--broker", "localhost:5555", "--trace", "x"],
        "no broker at": ["--broker", dead, "--trace", "x"],
        "cannot read the trace": ["--broker", broker.request_address, "--upload", broker.upload_address,
                                  "--keys", broker.device_keys, "--trace", str(tmp_path / "none.jsonl")],
        "not a key bundle": ["--broker", broker.request_address, "--upload", broker.upload_address,
                             "--keys", str(tmp_path), "--trace", str(tmp_path / "none.jsonl")],
    }
    main = _tool_main()
    for expected, args in cases.items():
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (args, r.stderr)
    # and as a real process: one line on stderr, exit code 2
    r = subprocess.run([sys.executable, str(TOOL), *cases["at least 1"]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --clients must be at least 1, got 0"]


def test_a_bfloat16_trace_keeps_its_rows_bit_for_bit(tmp_path):
    """.npy has no bfloat16: the rows are stored as their bits and come back as bfloat16, with the edge's dtype."""
    import numpy as np

    from cecollm.dtypes import numpy_dtype
    from cecollm.loadgen.trace import TraceHeader

    rows = np.linspace(-3, 3, 4 * 8).astype(numpy_dtype("bfloat16")).reshape(4, 8)
    header = TraceHeader("m", "id", 6, (2, 4), 4, "bfloat16", 8, 0.8, 4, "", dtype="bfloat16")
    Trace(header, [], rows).save(tmp_path / "t.jsonl")
    back = Trace.load(tmp_path / "t.jsonl")
    assert back.rows.dtype == numpy_dtype("bfloat16") and np.array_equal(back.rows.view(np.uint16), rows.view(np.uint16))
    assert back.header.dtype == "bfloat16" and back.header.wire_dtype == "bfloat16"
