"""A worker on "another host": started by hand with --remote, it gets device state as tensors over TCP.

It runs on this host, but cannot tell: shared memory is forbidden in its process (attaching a segment
raises), so every token it serves went through STATE_GRANT / STATE_COMMIT.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from cecollm.broker.launch import BrokerProcess
from cecollm.config import GenerationConfig
from cecollm.edge.client import EdgeClient, EdgeConfig
from cecollm.edge.heads import HeadSet, NormHead
from cecollm.engine import SplitEngine
from cecollm.runtime import free_ports
from cecollm.split import Split

from conftest import hf_greedy

EXITS = (2, 4)
PROMPT = [100, 7, 7, 300, 41, 12, 3]
# the worker's process: any shared-memory attachment is an error, so a fallback to /dev/shm cannot pass
NO_SHM_WORKER = """
import sys
from cecollm.cache import shm
def forbidden(name):
    raise RuntimeError(f"remote worker touched shared memory ({name})")
shm.attach = forbidden
shm.Attachment = forbidden
from cecollm.cloud.cli import main
sys.argv[0] = "cecollm-worker"
main()
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def split(loaded):
    return Split.create(loaded.n_layers, EXITS)


@pytest.fixture(scope="module")
def cloud(model_dir, tmp_path_factory):
    """A broker with no workers of its own, its sockets on TCP, and one remote worker started by hand."""
    logs = tmp_path_factory.mktemp("logs")
    (state_port,) = free_ports(1)
    with BrokerProcess(str(model_dir), workers=0, log_path=logs / "broker.log",
                       extra=["--exits", "2,4", "--state-address", f"tcp://*:{state_port}"]) as b:
        assert b.info["state"] == f"tcp://*:{state_port}"
        worker_log = open(logs / "worker.log", "w")
        # no --state: a remote worker finds the content manager on the broker's host, at the port it names
        worker = subprocess.Popen([sys.executable, "-c", NO_SHM_WORKER, "--broker", b.worker_address, "--remote",
                                   "--keys", b.worker_keys],
                                  stderr=worker_log)
        try:
            deadline = time.monotonic() + 180
            while "ready (remote" not in (logs / "worker.log").read_text() and time.monotonic() < deadline:
                assert worker.poll() is None, (logs / "worker.log").read_text()
                time.sleep(0.2)
            b.worker_log = logs / "worker.log"
            yield b
        finally:
            b.stop()
            worker.wait(timeout=20)  # told to go away by the broker
            worker_log.close()
        assert worker.returncode == 0


def _client(loaded, split, cloud, device, heads=None, **options):
    config = EdgeConfig(device_id=device, broker=cloud.request_address, upload=cloud.upload_address, fp16=False,
                        keys=cloud.device_keys,
                        **{"exact": False, "threshold": 1.0, "max_new_tokens": 16, "timeout": 20.0, "hello_timeout": 60.0, **options})
    return EdgeClient(loaded.model, loaded.identity, split, heads or HeadSet.lens(loaded.model, split.exits), config)


def test_a_remote_worker_matches_transformers(loaded, split, cloud):
    with _client(loaded, split, cloud, 1, max_new_tokens=20) as client:
        result = client.generate(PROMPT)
    assert result.token_ids == hf_greedy(loaded.model, PROMPT, 20)
    assert (result.stats.cloud_tokens, result.stats.fallback_tokens, result.stats.timeouts) == (20, 0, 0)
    assert result.stats.shm_bytes == 0
    text = cloud.worker_log.read_text()
    assert "remote: state as tensors from tcp://127.0.0.1:" in text and "shared memory" not in text
    assert "refused" not in text and "failed" not in text


class SharpHead(NormHead):
    """The logit lens, sharpened so that exits fire on a random tiny model."""

    def forward(self, hidden, lm_head):
        return 6.0 * lm_head(self.norm(hidden))


def test_a_remote_worker_with_exits_that_fire_matches_the_in_process_engine(loaded, split, cloud):
    """Positions decided at an exit reach the cloud only as rows: their KV is filled by the next request,
    which the remote worker must then send back for every position it folded."""
    heads = HeadSet(EXITS, {e: SharpHead(loaded.model.model.norm) for e in EXITS})
    engine = SplitEngine(loaded.model, split, heads)
    n = 24
    for threshold in (0.5, 0.3, 0.2, 0.1, 0.05):
        expected = engine.generate(PROMPT, GenerationConfig("collab", threshold, n, fp16=False))
        if expected.stats.edge_tokens and expected.stats.cloud_tokens:
            break
    else:
        pytest.fail("no threshold makes the sharpened heads fire only sometimes")
    with _client(loaded, split, cloud, 2, heads, threshold=threshold, max_new_tokens=n) as client:
        got = client.generate(PROMPT)
    assert got.token_ids == expected.token_ids
    assert [t.decided_by for t in got.tokens] == [t.decided_by for t in expected.tokens]
    assert (got.stats.edge_tokens, got.stats.cloud_tokens, got.stats.fallback_tokens) == (
        expected.stats.edge_tokens, expected.stats.cloud_tokens, 0)


def test_a_remote_worker_needs_a_tcp_state_socket(model_dir, tmp_path):
    """A broker whose content manager listens on ipc:// only: the remote worker says how to fix it, exit 2."""
    with BrokerProcess(str(model_dir), workers=0, log_path=tmp_path / "broker.log", extra=["--exits", "2,4"]) as b:
        out = subprocess.run([sys.executable, "-c", NO_SHM_WORKER, "--broker", b.worker_address, "--remote",
                                   "--keys", b.worker_keys],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--state-address tcp://*:PORT" in out.stderr and "Traceback" not in out.stderr


def test_a_local_worker_that_cannot_find_the_segment_says_to_run_remote(loaded, split):
    from cecollm.cloud.service import CloudService, Refused
    from cecollm.layers import DecoderRunner

    service = CloudService(DecoderRunner(loaded.model), split, loaded.identity, state=None)
    with pytest.raises(Refused, match="must run with --remote"):
        service._segment("cecollm-no-such-segment")


def test_a_remote_worker_verifies_drafts_and_rolls_back_exactly(loaded, split, cloud):
    """The exact mode with a remote worker: the grant carries the drafts, a wrong one ends with a
    STATE_COMMIT that rolls the session back, and the output is transformers' greedy output."""
    heads = HeadSet(EXITS, {e: SharpHead(loaded.model.model.norm) for e in EXITS})
    with _client(loaded, split, cloud, 3, heads, exact=True, threshold=0.5, max_new_tokens=24) as client:
        got = client.generate(PROMPT)
    assert got.token_ids == hf_greedy(loaded.model, PROMPT, 24)
    assert got.stats.rollbacks > 0 and got.stats.standalone_reason == ""
    assert "refused" not in cloud.worker_log.read_text()


def test_worker_cli_bad_addresses_are_one_line_exit_2():
    from click.testing import CliRunner

    from cecollm.cloud.cli import worker_command

    for args in (["--broker", "udp://x:1"], ["--broker", "ipc:///tmp/x", "--remote"],
                 ["--broker", "tcp://h:1", "--remote", "--state", "ipc:///tmp/s"]):
        out = CliRunner().invoke(worker_command, args)
        assert out.exit_code == 2 and out.output.startswith("error:") and "Traceback" not in out.output, args


def test_a_bfloat16_remote_worker_rolls_back_exactly_and_a_float32_one_is_refused(model_dir, split, tmp_path):
    """bfloat16 KV and rows travel as tensors (STATE_GRANT / STATE_COMMIT): the output is transformers' in
    bfloat16. A worker that expects another dtype than the broker serves says so on one line, exit 2."""
    from cecollm.loading import load_model

    from conftest import assert_greedy_equal

    (state_port,) = free_ports(1)
    with BrokerProcess(str(model_dir), workers=0, log_path=tmp_path / "broker.log",
                       extra=["--exits", "2,4", "--dtype", "bfloat16", "--state-address", f"tcp://*:{state_port}"]) as b:
        worker = [sys.executable, "-c", NO_SHM_WORKER, "--broker", b.worker_address, "--remote", "--keys", b.worker_keys]
        out = subprocess.run([*worker, "--dtype", "float32"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "dtype mismatch: this worker computes in float32, the broker serves bfloat16" in out.stderr
        worker_log = open(tmp_path / "worker.log", "w")
        proc = subprocess.Popen([*worker, "--dtype", "bfloat16"], stderr=worker_log)
        try:
            loaded = load_model(str(model_dir), "bfloat16")
            heads = HeadSet(EXITS, {e: SharpHead(loaded.model.model.norm) for e in EXITS})
            config = EdgeConfig(device_id=4, broker=b.request_address, upload=b.upload_address, keys=b.device_keys,
                                exact=True, threshold=0.5, max_new_tokens=24, timeout=20.0, hello_timeout=120.0)
            with EdgeClient(loaded.model, loaded.identity, split, heads, config) as client:
                assert client.wire_dtype == torch.bfloat16
                got = client.generate(PROMPT)
            assert_greedy_equal(loaded.model, PROMPT, got.token_ids, hf_greedy(loaded.model, PROMPT, 24))
            assert got.stats.rollbacks > 0 and got.stats.standalone_reason == "" and got.stats.shm_bytes == 0
            assert "refused" not in (tmp_path / "worker.log").read_text()
        finally:
            b.stop()
            try:
                proc.wait(timeout=60)  # told to go away by the broker (or it gives up waiting for one)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            worker_log.close()
