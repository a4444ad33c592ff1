"""The exact mode over ZeroMQ: edges that draft and never wait, a cloud that verifies behind them.

Random heads draft badly, so roll-backs happen all the time: every output must still be
transformers' greedy output, token for token, with two devices at once, with a worker killed
mid-generation, through shared memory, and in float16 (checked against the in-process exact
engine, which rounds the same way). A cloud lost mid-generation is said once and the edge
finishes alone with its tokens marked unverified."""

from __future__ import annotations

import os
import re
import signal
import threading

import orjson
import pytest
import torch
from click.testing import CliRunner
from test_engine import confident_heads

from cecollm.broker.launch import BrokerProcess
from cecollm.config import GenerationConfig
from cecollm.edge.client import EdgeClient, EdgeConfig
from cecollm.edge.heads import HeadSet
from cecollm.engine import SplitEngine
from cecollm.split import Split

from conftest import assert_greedy_equal, hf_greedy

EXITS = (2, 4)
PROMPTS = {21: [5, 17, 33, 2, 9], 22: [100, 7, 7, 300, 41, 12, 3, 8, 250, 1, 64]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def split(loaded):
    return Split.create(loaded.n_layers, EXITS)


@pytest.fixture(scope="module")
def heads(loaded):
    return confident_heads(loaded.model, EXITS, scale=6.0)


@pytest.fixture(scope="module")
def broker(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "broker.log"
    with BrokerProcess(str(model_dir), workers=2, extra=["--exits", "2,4", "--heartbeat-ms", "100"], log_path=log) as b:
        b.log_path = log
        yield b


def _client(loaded, split, heads, broker, device, **options):
    config = EdgeConfig(device_id=device, broker=broker.request_address, upload=broker.upload_address,
                        keys=broker.device_keys, **{"exact": True, "threshold": 0.5, "fp16": False, "max_new_tokens": 24, "timeout": 20.0,
                           **options})
    return EdgeClient(loaded.model, loaded.identity, split, heads, config)


def test_two_devices_at_once_equal_transformers_through_many_roll_backs(loaded, split, heads, broker):
    results, errors = {}, []

    def run(device, shm):
        try:
            with _client(loaded, split, heads, broker, device, shm=shm) as client:
                results[device] = client.generate(PROMPTS[device])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d, d == 22)) for d in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    for device, prompt in PROMPTS.items():
        r, s = results[device], results[device].stats
        assert r.token_ids == hf_greedy(loaded.model, prompt, 24), f"device {device}"
        assert s.rollbacks > 0 and s.drafts > len(r.token_ids), "random heads draft wrong tokens: roll-backs happen"
        assert all(t.verified for t in r.tokens) and s.fallback_tokens == 0 and s.standalone_reason == ""
        assert s.edge_tokens + s.cloud_tokens == 24 and s.verifies > 0
    assert results[22].stats.shm_bytes > 0


def test_float16_uploads_match_the_in_process_exact_engine(loaded, split, heads, broker):
    engine = SplitEngine(loaded.model, split, heads)
    prompt = PROMPTS[22]
    expected = engine.generate(prompt, GenerationConfig("exact", 0.5, 24, fp16=True))
    with _client(loaded, split, heads, broker, 23, fp16=True) as client:
        got = client.generate(prompt)
    assert got.token_ids == expected.token_ids


def test_waiting_below_a_confidence_is_the_cloud_deciding(loaded, split, broker):
    lens = HeadSet.lens(loaded.model, EXITS)
    with _client(loaded, split, lens, broker, 24, wait_below=1.0) as client:
        result = client.generate(PROMPTS[21])
    assert result.token_ids == hf_greedy(loaded.model, PROMPTS[21], 24)
    assert result.stats.drafts == 0 and result.stats.cloud_tokens == 24 and result.stats.rollbacks == 0


def test_a_worker_killed_mid_generation_changes_nothing(loaded, split, heads, broker):
    pids = [int(p) for p in re.findall(r"worker (\d+) ready \(", broker.log_path.read_text())]
    killed = []
    with _client(loaded, split, heads, broker, 25, max_new_tokens=30) as client:

        def kill_one(record):
            if not killed and record.position == len(PROMPTS[22]) + 6:
                alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
                os.kill(alive[0], signal.SIGKILL)
                killed.append(alive[0])

        result = client.generate(PROMPTS[22], kill_one)
    assert killed and result.token_ids == hf_greedy(loaded.model, PROMPTS[22], 30)
    assert result.stats.standalone_reason == "" and all(t.verified for t in result.tokens)


def test_a_lost_cloud_is_said_once_and_the_edge_finishes_alone(loaded, split, heads, model_dir, tmp_path, caplog):
    b = BrokerProcess(str(model_dir), workers=1, extra=["--exits", "2,4"], log_path=tmp_path / "broker.log")
    try:
        with _client(loaded, split, heads, b, 26, timeout=1.0, max_timeouts=1, max_new_tokens=20) as client:

            def stop_the_cloud(record):
                if record.position == len(PROMPTS[21]) + 3:
                    b.stop()

            result = client.generate(PROMPTS[21], stop_the_cloud)
    finally:
        b.stop()
    verified = [t.verified for t in result.tokens]
    assert len(result.token_ids) == 20 and verified[:4] == [True] * 4 and not all(verified)
    assert verified == sorted(verified, reverse=True)  # once unverified, unverified to the end
    assert result.stats.standalone_reason and result.stats.fallback_tokens == verified.count(False)
    assert sum("going on on the edge alone" in r.getMessage() for r in caplog.records) == 1


def test_the_cli_marks_each_token(model_dir, broker):
    from cecollm.edge.cli import edge_command

    args = ["--model", str(model_dir), "--exits", "2,4", "--broker", broker.request_address, "--upload",
            broker.upload_address, "--keys", broker.device_keys, "--device-id", "27", "--exact", "--no-fp16", "--raw",
            "--max-new-tokens", "8",
            "--prompt", "The cat", "--json"]
    out = CliRunner().invoke(edge_command, args)
    assert out.exit_code == 0, out.output
    line = orjson.loads(out.output.strip().splitlines()[-1])
    assert len(line["tokens"]) == 8 and all(t["verified"] is True for t in line["tokens"])
    assert {"drafts", "rollbacks", "wasted_seconds", "waiting_seconds", "verify_seconds"} <= set(line["stats"])
    bad = CliRunner().invoke(edge_command, [*args[:-1], "--standalone"])
    assert bad.exit_code == 2 and "cannot be --standalone" in bad.output
    for flag, drafted in (("", True), ("--paper", False)):  # the exact mode is the default; the paper's one flag away
        other = [a for a in args if a != "--exact"] + ([flag] if flag else [])
        out = CliRunner().invoke(edge_command, other)
        assert out.exit_code == 0, out.output
        stats = orjson.loads(out.output.strip().splitlines()[-1])["stats"]
        assert (stats["drafts"] > 0) == drafted, (flag, stats)


@pytest.fixture(scope="module")
def bf16_broker(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "broker-bf16.log"
    with BrokerProcess(str(model_dir), workers=1, extra=["--exits", "2,4", "--dtype", "bfloat16"], log_path=log) as b:
        yield b


def test_bfloat16_end_to_end_is_transformers_in_bfloat16_with_bfloat16_uploads(model_dir, split, bf16_broker):
    """A bfloat16 edge and cloud: uploads are bfloat16 (bit-exact, 2 bytes a value, over the socket and through
    shared memory) and the output is transformers' greedy output of the model in bfloat16."""
    from cecollm.loading import load_model

    loaded = load_model(str(model_dir), "bfloat16")
    heads = confident_heads(loaded.model, EXITS, scale=6.0)
    for device, shm in ((31, False), (32, True)):
        with _client(loaded, split, heads, bf16_broker, device, fp16=True, shm=shm) as client:
            assert client.wire_dtype == torch.bfloat16
            result = client.generate(PROMPTS[22])
        assert_greedy_equal(loaded.model, PROMPTS[22], result.token_ids, hf_greedy(loaded.model, PROMPTS[22], 24))
        assert result.stats.rollbacks > 0 and all(t.verified for t in result.tokens)
        assert (result.stats.shm_bytes > 0) == shm


def test_an_edge_in_another_dtype_is_refused_naming_both(loaded, split, heads, bf16_broker):
    from cecollm.errors import UserError

    with _client(loaded, split, heads, bf16_broker, 33) as client:
        with pytest.raises(UserError, match="dtype mismatch: the edge computes in float32, the cloud in bfloat16"):
            client.generate(PROMPTS[21])
