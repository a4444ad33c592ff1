"""End to end over TCP on loopback: a broker daemon (subprocess) with workers, and edge clients."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import orjson
import psutil
import pytest
import torch
import zmq
from click.testing import CliRunner

from cecollm.broker.launch import BrokerProcess
from cecollm.config import GenerationConfig
from cecollm.edge.client import EdgeClient, EdgeConfig
from cecollm.edge.heads import HeadSet, NormHead
from cecollm.edge.session import EdgeStats
from cecollm.engine import SplitEngine
from cecollm.errors import UserError
from cecollm.split import Split
from cecollm.wire import edge_cloud as ep
from cecollm.wire.security import ClientKeys
from cecollm.wire.wire import ErrorCode

from conftest import hf_greedy

EXITS = (2, 4)
PROMPTS = {1: [5, 17, 33, 2, 9], 2: [100, 7, 7, 300, 41, 12, 3], 3: [250, 1, 64]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def split(loaded):
    return Split.create(loaded.n_layers, EXITS)


@pytest.fixture(scope="module")
def broker(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "broker.log"
    with BrokerProcess(str(model_dir), workers=2, extra=["--exits", "2,4"], log_path=log) as b:
        b.log_path = log
        yield b


def _client(loaded, split, broker, device, heads=None, **options):
    config = EdgeConfig(device_id=device, broker=broker.request_address, upload=broker.upload_address,
                        keys=broker.device_keys, **{"exact": False, "threshold": 1.0, "max_new_tokens": 16, "timeout": 20.0, **options})
    return EdgeClient(loaded.model, loaded.identity, split, heads or HeadSet.lens(loaded.model, split.exits), config)


def test_three_edges_at_once_match_transformers(loaded, split, broker):
    options = {1: {}, 2: {"shm": True}, 3: {"fp16": False}}  # TCP, shared memory, float32 rows
    results, errors = {}, []

    def run(device):
        try:
            with _client(loaded, split, broker, device, max_new_tokens=20, **options[device]) as client:
                results[device] = client.generate(PROMPTS[device])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for device, prompt in PROMPTS.items():
        r = results[device]
        assert r.token_ids == hf_greedy(loaded.model, prompt, 20), f"device {device}"
        assert (r.stats.cloud_tokens, r.stats.fallback_tokens, r.stats.timeouts) == (20, 0, 0)
        assert r.stats.standalone_reason == ""
    assert results[2].stats.shm_bytes > 0 and results[1].stats.shm_bytes == 0
    assert results[3].stats.bytes_up > results[1].stats.bytes_up  # float32 rows are twice the size


class SharpHead(NormHead):
    """The logit lens, sharpened so that exits fire on a random tiny model."""

    def forward(self, hidden, lm_head):
        return 6.0 * lm_head(self.norm(hidden))


def test_exits_that_fire_match_the_in_process_engine(loaded, split, broker):
    heads = HeadSet(EXITS, {e: SharpHead(loaded.model.model.norm) for e in EXITS})
    engine = SplitEngine(loaded.model, split, heads)
    prompt, n = PROMPTS[2], 24
    for threshold in (0.5, 0.3, 0.2, 0.1, 0.05):
        expected = engine.generate(prompt, GenerationConfig("collab", threshold, n))
        if expected.stats.edge_tokens and expected.stats.cloud_tokens:
            break
    else:
        pytest.fail("no threshold makes the sharpened heads fire only sometimes")
    with _client(loaded, split, broker, 7, heads, threshold=threshold, max_new_tokens=n) as client:
        got = client.generate(prompt)
    assert got.token_ids == expected.token_ids
    assert [t.decided_by for t in got.tokens] == [t.decided_by for t in expected.tokens]
    assert (got.stats.edge_tokens, got.stats.cloud_tokens) == (expected.stats.edge_tokens, expected.stats.cloud_tokens)


def test_edge_reuploads_when_the_cloud_lost_its_state(loaded, split, broker):
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    ClientKeys.load(broker.device_keys).secure(push)  # the device's own key: the cloud takes its END
    push.connect(broker.upload_address)
    with _client(loaded, split, broker, 8) as client:

        def forget(record):
            if record.position == len(PROMPTS[1]) + 3:  # the cloud drops the state mid-generation
                push.send_multipart(ep.End(8, client.session).to_frames())

        result = client.generate(PROMPTS[1], forget)
    push.close(0)
    assert result.token_ids == hf_greedy(loaded.model, PROMPTS[1], 16)
    assert result.stats.reuploads == 1 and result.stats.fallback_tokens == 0


def test_a_mismatched_edge_is_refused_with_a_clear_error(loaded, broker, model_dir):
    other_split = Split.create(loaded.n_layers, (2, 3))
    with _client(loaded, other_split, broker, 9, max_new_tokens=4) as client:
        with pytest.raises(UserError, match=r"split mismatch: the edge has exits 2,3, upload after 3, the cloud "
                                            r"serves exits 2,4, upload after 4"):
            client.generate(PROMPTS[1])
    split = Split.create(loaded.n_layers, EXITS)
    with _client(loaded, split, broker, 9, max_new_tokens=2) as client:
        client.identity = "0" * 32
        with pytest.raises(UserError, match="model mismatch"):
            client.generate(PROMPTS[1])
    from cecollm.edge.cli import edge_command

    out = CliRunner().invoke(edge_command, ["--model", str(model_dir), "--exits", "2,3", "--broker",
                                            broker.request_address, "--upload", broker.upload_address, "--raw",
                                            "--keys", broker.device_keys, "--prompt", "hello"])
    assert out.exit_code == 2 and "error: the cloud at" in out.output and "split mismatch" in out.output


def test_cli_streams_tokens_as_json(loaded, model_dir, broker):
    from cecollm.edge.cli import edge_command

    args = ["--model", str(model_dir), "--exits", "2,4", "--broker", broker.request_address, "--upload",
            broker.upload_address, "--keys", broker.device_keys, "--device-id", "11", "--paper", "--threshold", "1.0", "--raw",
            "--max-new-tokens", "6",
            "--prompt", "The capital of France is", "--json"]
    out = CliRunner().invoke(edge_command, args)
    assert out.exit_code == 0, out.output
    row = orjson.loads(out.stdout.strip().splitlines()[-1])
    prompt_ids = loaded.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert row["token_ids"] == hf_greedy(loaded.model, prompt_ids, 6)
    assert row["device_id"] == 11 and row["stats"]["cloud_tokens"] == 6


def test_edge_cli_bad_input_is_one_line_exit_2(model_dir):
    from cecollm.edge.cli import edge_command

    out = CliRunner().invoke(edge_command, ["--threshold", "2", "--prompt", "x"])
    assert out.exit_code == 2 and out.output.strip().startswith("error:") and "Traceback" not in out.output


def _fake_cloud(address: str, stop: threading.Event, answer) -> None:
    """A cloud that replies `answer(msg)` (None: no reply) to every request."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    while not stop.is_set():
        if sock.poll(50):
            peer, _, *frames = sock.recv_multipart()
            reply = answer(ep.parse(frames))
            if reply is not None:
                sock.send_multipart([peer, b"", *reply.to_frames()])
    sock.close(0)


def _welcome_only(msg):
    """Answers HELLO, never DECIDE: a cloud that stopped answering."""
    return ep.Welcome(msg.device_id, msg.seq, 1, 64, 0, "") if isinstance(msg, ep.Hello) else None


def _forgetful(msg):
    """Opens sessions but has always lost the state by the time a token is asked for."""
    if isinstance(msg, ep.Hello):
        return _welcome_only(msg)
    return ep.Error(msg.seq, ErrorCode.UNKNOWN_DEVICE, "evicted to make room (byte budget)")


def _full(msg):
    return ep.Error(msg.seq, ErrorCode.BUDGET, "no room for 1000 bytes")


def _run_against(loaded, split, answer, **options):
    from cecollm.runtime import free_ports

    port, upload = free_ports(2)
    stop = threading.Event()
    server = threading.Thread(target=_fake_cloud, args=(f"tcp://127.0.0.1:{port}", stop, answer))
    server.start()
    try:
        config = EdgeConfig(device_id=1, broker=f"tcp://127.0.0.1:{port}", upload=f"tcp://127.0.0.1:{upload}",
                            insecure=True, **{"exact": False, "threshold": 1.0, "max_new_tokens": 8, **options})
        with EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, EXITS), config) as client:
            return client.generate(PROMPTS[3])
    finally:
        stop.set()
        server.join()


def test_an_unreliable_cloud_never_stops_a_generation(loaded, split):
    alone = SplitEngine(loaded.model, split, HeadSet.lens(loaded.model, EXITS)).generate(
        PROMPTS[3], GenerationConfig("standalone", 1.0, 8))
    # requests time out: decided at the last exit, then the rest on the edge alone
    result = _run_against(loaded, split, _welcome_only, timeout=0.2, max_timeouts=3)
    assert result.token_ids == alone.token_ids
    assert result.stats.timeouts == 3 and result.stats.fallback_tokens == 8
    assert "3 requests in a row timed out" in result.stats.standalone_reason
    # the state is lost even after a re-upload: the edge finishes alone and says why
    result = _run_against(loaded, split, _forgetful)
    assert result.token_ids == alone.token_ids and result.stats.reuploads == 1
    assert "lost the device's state again" in result.stats.standalone_reason
    # no room on the cloud
    result = _run_against(loaded, split, _full)
    assert result.token_ids == alone.token_ids and "no room" in result.stats.standalone_reason
    # no cloud at all: HELLO times out
    result = _run_against(loaded, split, lambda msg: None, hello_timeout=0.2)
    assert result.token_ids == alone.token_ids and "did not answer HELLO" in result.stats.standalone_reason


def test_a_worker_killed_mid_generation_and_shutdown_leaves_nothing(loaded, split, model_dir, tmp_path):
    log = tmp_path / "broker.log"
    b = BrokerProcess(str(model_dir), workers=2, extra=["--exits", "2,4", "--heartbeat-ms", "100"], log_path=log)
    try:
        pids = [int(p) for p in re.findall(r"worker (\d+) ready \(", log.read_text())]
        assert len(pids) == 2
        killed = []
        with _client(loaded, split, b, 5, max_new_tokens=20) as client:

            def kill_one(record):
                if not killed and record.position == len(PROMPTS[2]) + 4:
                    # the device's worker (the broker sends its requests there): the one that maps its segment
                    serving = [p for p in pids if "/dev/shm/cecollm-" in Path(f"/proc/{p}/maps").read_text()]
                    assert len(serving) == 1, serving
                    os.kill(serving[0], signal.SIGKILL)
                    killed.append(serving[0])

            result = client.generate(PROMPTS[2], kill_one)
        assert killed
        assert result.token_ids == hf_greedy(loaded.model, PROMPTS[2], 20)
        assert (result.stats.cloud_tokens, result.stats.timeouts) == (20, 0)
        deadline = time.monotonic() + 10
        while "purged" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        assert f"worker {killed[0]} is silent: purged" in text
        assert f"of the dead worker {killed[0]} goes to another worker" in text  # it was working for us
        while "(2 ready)" not in log.read_text().split("starting another")[-1] and time.monotonic() < deadline + 60:
            time.sleep(0.2)
        assert f"worker {killed[0]} exited (code -9); starting another" in log.read_text()
        assert "(2 ready)" in log.read_text().split("starting another")[-1]  # the replacement serves
        # leave a session open, then stop: everything goes, nothing stays in /dev/shm
        client = _client(loaded, split, b, 6)
        client._connect()
        client._open(EdgeStats(), [])
        client.close()
        assert any(name.startswith(f"cecollm-{b.proc.pid}-") for name in os.listdir("/dev/shm"))
        children = psutil.Process(b.proc.pid).children(recursive=True)
    finally:
        code = b.stop()
    assert code == 0
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"cecollm-{b.proc.pid}-")]
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]



def test_a_worker_started_by_hand_edges_over_ipc_and_sigint(loaded, split, model_dir, tmp_path):
    import subprocess
    import sys

    base = f"ipc://{tmp_path}/cecollm"
    b = BrokerProcess(str(model_dir), workers=0, log_path=tmp_path / "broker.log", ipc_base=base,
                      extra=["--exits", "2,4"])
    worker = subprocess.Popen([sys.executable, "-c", "from cecollm.cloud.cli import main; main()",
                               "--broker", b.worker_address, "--keys", b.worker_keys], stderr=subprocess.DEVNULL)
    try:
        config = EdgeConfig(exact=False, device_id=12, broker=f"{base}.requests", threshold=1.0, max_new_tokens=10, timeout=60,
                            hello_timeout=180, keys=b.device_keys)  # the worker may still be loading on a busy machine
        assert config.upload_address == f"{base}.uploads" and config.use_shm
        with EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, EXITS), config) as client:
            result = client.generate(PROMPTS[3])  # waits in the queue until the worker is ready
        assert result.token_ids == hf_greedy(loaded.model, PROMPTS[3], 10)
        assert result.stats.shm_bytes > 0 and result.stats.cloud_tokens == 10
    finally:
        b.proc.send_signal(signal.SIGINT)
        code = b.stop()
        worker.wait(timeout=20)  # told to go away by the broker, or it notices the silence
    assert code == 0 and worker.returncode == 0
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"cecollm-{b.proc.pid}-")]
    assert not list(tmp_path.glob("cecollm.*"))  # ipc socket files removed


def _capacity_refused(msg):
    """Opens sessions, then refuses every position: beyond the session's capacity."""
    if isinstance(msg, ep.Hello):
        return _welcome_only(msg)
    return ep.Error(msg.seq, ErrorCode.CAPACITY, "position 9 is beyond the capacity of 8 positions")


def test_an_edge_that_goes_alone_releases_its_cloud_state(loaded, split):
    """The cloud's state for a session the edge gave up on is released now, not after the idle TTL."""
    from cecollm.runtime import free_ports

    port, upload = free_ports(2)
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(f"tcp://127.0.0.1:{upload}")
    stop = threading.Event()
    server = threading.Thread(target=_fake_cloud, args=(f"tcp://127.0.0.1:{port}", stop, _capacity_refused))
    server.start()
    try:
        config = EdgeConfig(exact=False, device_id=1, broker=f"tcp://127.0.0.1:{port}", upload=f"tcp://127.0.0.1:{upload}",
                            threshold=1.0, max_new_tokens=4, timeout=20.0, insecure=True)
        with EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, EXITS), config) as client:
            result = client.generate(PROMPTS[3])
        assert "capacity" in result.stats.standalone_reason
        kinds = [type(ep.parse(pull.recv_multipart())).__name__ for _ in range(2) if pull.poll(30_000)]
        assert kinds == ["Upload", "End"]  # the prompt's rows, then the session is given back
    finally:
        stop.set()
        server.join()
        pull.close(0)


def test_a_killed_broker_leaves_no_content_manager_behind(model_dir, tmp_path):
    """SIGKILL gives the broker no chance to clean up: its content manager notices and goes, with its segments."""
    from cecollm.wire import worker_state as sp
    from cecollm.wire.rpc import RpcSocket

    b = BrokerProcess(str(model_dir), workers=0, extra=["--exits", "2,4"], log_path=tmp_path / "broker.log")
    (manager,) = [c for c in psutil.Process(b.proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    try:
        rpc = RpcSocket(zmq.Context.instance(), f"ipc:///tmp/cecollm-{b.proc.pid}-state.ipc")
        rpc.send(sp.Open(1, 1).to_frames())
        opened = sp.parse(rpc.receive(time.monotonic() + 60))
        rpc.close()
        assert os.path.exists(f"/dev/shm/{opened.segment}")
        b.proc.kill()
        b.stop()
        manager.wait(60)  # psutil.TimeoutExpired if it lives on
        assert not os.path.exists(f"/dev/shm/{opened.segment}")
    finally:
        if manager.is_running():
            manager.kill()
            manager.wait(10)
        from cecollm.cache.shm import remove_leftovers

        remove_leftovers(f"cecollm-{b.proc.pid}-")


def _shm_left(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"cecollm-{pid}-")]


def test_a_killed_content_manager_is_replaced_and_the_output_stays_the_same(loaded, split, model_dir, tmp_path):
    log = tmp_path / "broker.log"
    b = BrokerProcess(str(model_dir), workers=1, extra=["--exits", "2,4"], log_path=log)
    try:
        first = b.content_manager_pid()
        killed = []
        with _client(loaded, split, b, 5, max_new_tokens=20, timeout=5.0) as client:  # the edge's default timeout

            def kill(record):
                if not killed and record.position == len(PROMPTS[2]) + 5:
                    os.kill(first, signal.SIGKILL)
                    killed.append(first)

            result = client.generate(PROMPTS[2], kill)
            assert killed
            assert result.token_ids == hf_greedy(loaded.model, PROMPTS[2], 20)
            assert (result.stats.cloud_tokens, result.stats.fallback_tokens, result.stats.reuploads) == (20, 0, 1)
            again = client.generate(PROMPTS[1])  # the new content manager serves the next generation as usual
        assert again.token_ids == hf_greedy(loaded.model, PROMPTS[1], 20) and again.stats.reuploads == 0
        assert b.content_manager_pid() not in (0, first)
        assert "the content manager exited (code -9); starting another" in log.read_text()
    finally:
        code = b.stop()
    assert code == 0 and not _shm_left(b.proc.pid)
    assert "resource_tracker" not in log.read_text()  # the killed manager's segments were ours to remove


def test_an_edge_outlives_a_broker_restart_and_goes_on_with_the_cloud(loaded, split, model_dir, tmp_path):
    """The broker goes away mid-generation and comes back on the same ports a few seconds later: the edge,
    with its default timeouts, decides tokens itself meanwhile and then goes on with the cloud."""
    keys = tmp_path / "keys"
    b = BrokerProcess(str(model_dir), workers=1, extra=["--exits", "2,4"], log_path=tmp_path / "first.log",
                      keys_dir=keys)
    brokers = [b]
    restart_at = len(PROMPTS[1]) + 3

    done = threading.Event()

    def restart():
        brokers[0].stop()
        brokers.append(BrokerProcess(str(model_dir), workers=1, extra=["--exits", "2,4"], ports=b.ports,
                                     log_path=tmp_path / "second.log", keys_dir=keys))
        done.wait()  # the broker's parent-death signal fires when the thread that started it ends

    thread = threading.Thread(target=restart)
    config = EdgeConfig(exact=False, device_id=5, broker=b.request_address, upload=b.upload_address, threshold=1.0,
                        max_new_tokens=200, keys=b.device_keys)  # timeouts as cecollm-edge has them
    try:
        with EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, EXITS), config) as client:
            client.eos = set()  # the tokens decided alone may hit the random model's EOS: go on to the end

            def pace(record):  # a real edge takes its time per token; the tiny model would finish at once
                if record.position == restart_at:
                    thread.start()
                if record.position >= restart_at:
                    time.sleep(0.15)

            result = client.generate(PROMPTS[1], pace)
    finally:
        for broker in brokers:
            broker.stop()
        done.set()
        thread.join(120)
    assert len(brokers) == 2
    after = [t.decided_by for t in result.tokens if t.position > restart_at]
    back = after.index("cloud")  # the cloud decides again...
    assert back > 0 and set(after[back:]) == {"cloud"}  # ...and every token from then on
    assert result.stats.rejoins + result.stats.reuploads >= 1 and result.stats.standalone_reason == ""


def test_sigterm_stops_the_cloud_promptly_and_a_budget_below_one_device_is_refused(model_dir, tmp_path):
    import subprocess
    import sys

    b = BrokerProcess(str(model_dir), workers=2, extra=["--exits", "2,4"], log_path=tmp_path / "broker.log")
    children = psutil.Process(b.proc.pid).children(recursive=True)
    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    b.proc.wait(30)  # a hang guard; the time it took is printed
    took = time.monotonic() - t0
    b.stop()
    print(f"SIGTERM to exit: {took:.2f} s")
    time.sleep(0.2)
    assert b.proc.returncode == 0 and not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    run = subprocess.run([sys.executable, "-m", "cecollm.broker", "--model", str(model_dir), "--insecure",
                          "--budget-mb", "1", "--capacity", "100000"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "holds no device" in run.stderr and "Traceback" not in run.stderr, run.stderr
