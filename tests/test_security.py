"""The key ring and a broker with keys, tried as a hostile client would: without a key, with an
unknown key, with a device's key acting for another device, as a rogue worker; SIGHUP reloads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zmq
from click.testing import CliRunner
from zmq.utils.monitor import recv_monitor_message

from cecollm.broker.launch import BrokerProcess
from cecollm.cli import cli
from cecollm.edge.client import EdgeClient, EdgeConfig
from cecollm.edge.heads import HeadSet
from cecollm.errors import UserError
from cecollm.loading import load_model
from cecollm.split import Split
from cecollm.wire import broker_worker as wp
from cecollm.wire import edge_cloud as ep
from cecollm.wire.security import ClientKeys, KeyRing, loopback_only, make_keys, parse_ids
from cecollm.wire.wire import ErrorCode

from conftest import hf_greedy

EXITS = (2, 4)


def test_parse_ids():
    assert parse_ids("3") == [(3, 3)]
    assert parse_ids("3, 5-7") == [(3, 3), (5, 7)]
    assert parse_ids("*") == [(0, (1 << 32) - 1)]
    for bad in ("", "x", "7-5", "-1", str(1 << 32)):
        with pytest.raises(UserError):
            parse_ids(bad)


def test_loopback_only():
    assert loopback_only("tcp://*:5555") == "tcp://127.0.0.1:5555"
    assert loopback_only("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert loopback_only("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert loopback_only("ipc:///tmp/x") == "ipc:///tmp/x"
    with pytest.raises(UserError, match="cecollm keys"):
        loopback_only("tcp://10.1.2.3:5555")


def test_keys_command_and_ring(tmp_path):
    result = CliRunner().invoke(cli, ["keys", str(tmp_path), "--device", "3", "--device", "fleet=10-19", "--worker", "gpu1"])
    assert result.exit_code == 0, result.output
    for bundle in ("device-3", "device-fleet", "worker-gpu1"):
        assert (tmp_path / "bundles" / bundle / "client.key_secret").is_file()
    ring = KeyRing(tmp_path)
    three, fleet = (ClientKeys.load(tmp_path / "bundles" / b) for b in ("device-3", "device-fleet"))
    assert three.server == ring.public
    assert ring.may_act_for(three.public, 3) and not ring.may_act_for(three.public, 4)
    assert ring.may_act_for(fleet.public, 10) and ring.may_act_for(fleet.public, 19) and not ring.may_act_for(fleet.public, 3)
    assert not ring.may_act_for(None, 3) and not ring.may_act_for(b"x" * 40, 3)
    assert ring.accepts("workers", ClientKeys.load(tmp_path / "bundles" / "worker-gpu1").public)
    assert not ring.accepts("devices", ClientKeys.load(tmp_path / "bundles" / "worker-gpu1").public)
    again = CliRunner().invoke(cli, ["keys", str(tmp_path), "--device", "3"])
    assert again.exit_code != 0 and "exists already" in again.output  # never overwrites a bundle
    assert KeyRing(tmp_path).public == ring.public  # the broker's pair is kept
    listed = (tmp_path / "devices.txt").read_text()
    half = CliRunner().invoke(cli, ["keys", str(tmp_path), "--device", "4", "--device", "bad=x"])
    assert half.exit_code == 2 and "device ids" in half.output
    assert not (tmp_path / "bundles" / "device-4").exists() and (tmp_path / "devices.txt").read_text() == listed


def test_broker_without_keys_refuses_to_start(tmp_path, model_dir):
    env = {**os.environ, "CECOLLM_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "cecollm.broker", "--model", str(model_dir)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "cecollm keys" in lines[0] and "--insecure" in lines[0], run.stderr
    run = subprocess.run([sys.executable, "-m", "cecollm.broker", "--model", str(model_dir), "--insecure",
                          "--requests", "tcp://10.1.2.3:5555"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "loopback only" in run.stderr and "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def cloud(model_dir, tmp_path_factory):
    """A broker whose keys know alice (device 5), bob (device 6) and the launcher's own keys."""
    torch.set_num_threads(1)
    keys = tmp_path_factory.mktemp("keys")
    make_keys(keys, [("alice", "5"), ("bob", "6")], [])
    log = tmp_path_factory.mktemp("logs") / "broker.log"
    with BrokerProcess(str(model_dir), workers=1, extra=["--exits", "2,4"], log_path=log, keys_dir=keys) as b:
        b.log_path = log
        yield b, load_model(str(model_dir))


def _dealer(address: str, keys: ClientKeys | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.secure(sock)
    sock.connect(address)
    return sock


def _hello(loaded, device: int) -> list:
    return [b"", *ep.Hello(device, 1, loaded.identity, loaded.n_layers, EXITS, 4, "float32", "float16", False).to_frames()]


def _reply(sock: zmq.Socket, timeout_ms: int):
    if not sock.poll(timeout_ms):
        return None
    return ep.parse(sock.recv_multipart()[1:])


def _bundle(broker, name) -> ClientKeys:
    return ClientKeys.load(broker.keys_dir / "bundles" / name)


def _stranger(broker) -> ClientKeys:
    public, secret = zmq.curve_keypair()
    return ClientKeys(public, secret, _bundle(broker, "device-alice").server)


def test_no_key_and_unknown_key_never_reach_the_broker(cloud):
    broker, loaded = cloud
    before = broker.log_path.read_text().count("edge request")
    for keys in (None, _stranger(broker)):
        sock = _dealer(broker.request_address, keys)
        sock.send_multipart(_hello(loaded, 5))
        assert _reply(sock, 1500) is None  # no handshake, no message in: nothing to answer
        sock.close(0)
    assert "is not a devices key" in broker.log_path.read_text()  # the authenticator refused the stranger
    assert broker.log_path.read_text().count("edge request") == before


def test_a_device_key_cannot_act_for_another_device(cloud):
    broker, loaded = cloud
    alice, bob = _bundle(broker, "device-alice"), _bundle(broker, "device-bob")
    sock = _dealer(broker.request_address, alice)
    sock.send_multipart(_hello(loaded, 6))  # alice says she is bob
    refusal = _reply(sock, 10_000)
    assert isinstance(refusal, ep.Error) and refusal.code == ErrorCode.FORBIDDEN
    sock.send_multipart(_hello(loaded, 5))  # her own device: welcome
    assert isinstance(_reply(sock, 10_000), ep.Welcome)
    sock.close(0)
    split = Split.create(loaded.n_layers, EXITS)
    config = EdgeConfig(exact=False, device_id=6, broker=broker.request_address, upload=broker.upload_address, threshold=1.0,
                        max_new_tokens=10, timeout=20, keys=str(broker.keys_dir / "bundles" / "device-bob"))
    push = zmq.Context.instance().socket(zmq.PUSH)
    alice.secure(push)
    push.connect(broker.upload_address)
    prompt = [9, 8, 7, 6]
    with EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, EXITS), config) as client:

        def forge(record):  # alice ends bob's session and pushes rows for it, mid-generation
            push.send_multipart(ep.End(6, client.session).to_frames())
            rows = np.zeros((1, loaded.model.config.hidden_size), np.float16)
            push.send_multipart([bytes(f) for f in ep.Upload(6, client.session, 0, record.position, rows).to_frames()])

        result = client.generate(prompt, forge)
    push.close(0)
    assert bob.public != alice.public
    assert result.token_ids == hf_greedy(loaded.model, prompt, 10)
    assert result.stats.cloud_tokens == 10 and result.stats.reuploads == 0 and result.stats.fallback_tokens == 0
    assert "a key acted for device 6, which it may not" in broker.log_path.read_text()


def test_a_worker_without_a_worker_key_gets_nothing(cloud):
    broker, _ = cloud
    for keys in (None, _stranger(broker), _bundle(broker, "device-alice")):  # a device's key is no worker's
        sock = _dealer(broker.worker_address, keys)
        sock.send_multipart(wp.Connect(os.getpid()).to_frames())
        assert not sock.poll(1500), "a rogue worker got the broker's configuration"
        sock.close(0)


def test_sighup_reloads_the_keys(cloud):
    broker, loaded = cloud
    (carol,) = make_keys(broker.keys_dir, [("carol", "7")], [])
    keys = ClientKeys.load(carol)
    sock = _dealer(broker.request_address, keys)
    sock.send_multipart(_hello(loaded, 7))
    assert _reply(sock, 1500) is None  # not listed when the broker read its keys
    sock.close(0)
    os.kill(broker.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sock = _dealer(broker.request_address, keys)
        sock.send_multipart(_hello(loaded, 7))
        reply = _reply(sock, 1000)
        sock.close(0)
        if reply is not None:
            break
    assert isinstance(reply, ep.Welcome), reply
    devices = broker.keys_dir / "devices.txt"
    good = devices.read_text()
    devices.write_text(good + "not-a-key 3\n")  # a typo, then SIGHUP: the keys loaded before stay in use
    try:
        os.kill(broker.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while broker.log_path.read_text().count("reload failed") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # the broker's and the content manager's line
        assert broker.log_path.read_text().count("reload failed") == 2 and broker.proc.poll() is None
        sock = _dealer(broker.request_address, keys)
        sock.send_multipart(_hello(loaded, 7))
        assert isinstance(_reply(sock, 10_000), ep.Welcome)  # carol still gets in
        sock.close(0)
    finally:
        devices.write_text(good)


# ---- a hostile client that holds a key for every device id (the worst case: a fleet key let in) ----------
def _hostile(broker) -> ClientKeys:
    return _bundle(broker, "device-any")


def _hello_as(loaded, device: int, seq: int, instance: int, take_over: bool = False) -> list:
    return [b"", *ep.Hello(device, seq, loaded.identity, loaded.n_layers, EXITS, 4, "float32", "float16", False, instance,
                           take_over).to_frames()]


def _bob(loaded, broker, **options) -> EdgeClient:
    config = EdgeConfig(**{"exact": False, "device_id": 6, "broker": broker.request_address, "upload": broker.upload_address,
                           "threshold": 1.0, "max_new_tokens": 12, "timeout": 20.0,
                           "keys": str(broker.keys_dir / "bundles" / "device-bob"), **options})
    return EdgeClient(loaded.model, loaded.identity, Split.create(loaded.n_layers, EXITS),
                      HeadSet.lens(loaded.model, EXITS), config)


def test_sessions_are_random_and_guessed_ones_touch_nothing(cloud):
    broker, loaded = cloud
    sock = _dealer(broker.request_address, _hostile(broker))
    sessions = []
    for seq in range(1, 9):  # the same edge (instance) reopening device 40: a new session each time
        sock.send_multipart(_hello_as(loaded, 40, seq, instance=77))
        sessions.append(_reply(sock, 10_000).session)
    assert len(set(sessions)) == 8 and sum(s > 1 << 40 for s in sessions) >= 6  # 64 random bits, not a counter
    push = zmq.Context.instance().socket(zmq.PUSH)
    _hostile(broker).secure(push)
    push.connect(broker.upload_address)
    refusals = []
    prompt = [4, 8, 15, 16]
    with _bob(loaded, broker) as client:

        def probe(record):  # around the victim's session: END, UPLOAD and DECIDE with guessed numbers
            for guess in (client.session + d for d in (-3, -2, -1, 1, 2, 3)):
                push.send_multipart(ep.End(6, guess).to_frames())
                rows = np.zeros((1, loaded.model.config.hidden_size), np.float16)
                push.send_multipart([bytes(f) for f in ep.Upload(6, guess, 0, record.position, rows).to_frames()])
                sock.send_multipart([b"", *ep.Decide(6, 100 + record.position, guess, record.position).to_frames()])
                refusals.append(_reply(sock, 10_000))

        result = client.generate(prompt, probe)
    push.close(0)
    sock.close(0)
    assert result.token_ids == hf_greedy(loaded.model, prompt, 12)
    assert result.stats.cloud_tokens == 12 and result.stats.reuploads == 0
    assert refusals and all(r.code == ErrorCode.UNKNOWN_DEVICE for r in refusals)
    assert all(str(client.session) not in r.message for r in refusals)  # the victim's session is never told


def test_a_device_id_in_use_is_refused_and_taken_over_only_when_asked(cloud):
    broker, loaded = cloud
    sock = _dealer(broker.request_address, _hostile(broker))
    prompt, other = [9, 9, 2, 7], [3, 1, 4]
    answers = []
    with _bob(loaded, broker) as first, _bob(loaded, broker, max_new_tokens=6) as second:

        def intrude(record):
            if record.position == len(prompt) + 2:  # mid-generation: a second edge, then a flood of HELLOs
                with pytest.raises(UserError, match="in use by another edge"):
                    second.generate(other)
                for seq in range(1, 51):
                    sock.send_multipart(_hello_as(loaded, 6, seq, instance=1234))
                    answers.append(_reply(sock, 10_000))

        result = first.generate(prompt, intrude)
        assert result.token_ids == hf_greedy(loaded.model, prompt, 12)
        assert result.stats.reuploads == 0 and result.stats.fallback_tokens == 0
        assert len(answers) == 50 and all(a.code == ErrorCode.IN_USE for a in answers)

        def take_over(record):
            if record.position == len(prompt) + 2:
                taker = _bob(loaded, broker, max_new_tokens=6, take_over=True)
                with taker:
                    took = taker.generate(other)
                assert took.token_ids == hf_greedy(loaded.model, other, 6) and took.stats.cloud_tokens == 6

        again = first.generate(prompt, take_over)  # its session was taken once: it opens a new one, once
    sock.close(0)
    assert again.token_ids == hf_greedy(loaded.model, prompt, 12)
    assert again.stats.reuploads == 1 and again.stats.fallback_tokens == 0


def _peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had, in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_an_oversized_frame_is_cut_off_before_it_is_read(cloud):
    broker, loaded = cloud
    pids = {"broker": broker.proc.pid, "content manager": broker.content_manager_pid()}
    before = {name: _peak_rss(pid) for name, pid in pids.items()}
    big = np.zeros(200 << 20, np.uint8)  # 200 MB: far beyond any message these sockets take
    for kind, address in ((zmq.DEALER, broker.request_address), (zmq.PUSH, broker.upload_address)):
        sock = zmq.Context.instance().socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        _hostile(broker).secure(sock)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        head = ep.Decide(6, 1, 1, 1).to_frames()[0]
        sock.send_multipart([b"", head, big] if kind == zmq.DEALER else [head, big], copy=False)
        events = []
        while zmq.EVENT_DISCONNECTED not in events and monitor.poll(20_000):
            events.append(recv_monitor_message(monitor)["event"])
        assert zmq.EVENT_DISCONNECTED in events, f"{address}: the sender of an oversized frame stayed connected"
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
    for name, pid in pids.items():
        grew = _peak_rss(pid) - before[name]
        assert grew < 64 << 20, f"the {name}'s peak memory grew by {grew >> 20} MiB"
    with _bob(loaded, broker, max_new_tokens=6) as client:  # and the cloud serves on
        result = client.generate([5, 6, 7])
    assert result.token_ids == hf_greedy(loaded.model, [5, 6, 7], 6) and result.stats.cloud_tokens == 6


def test_requests_for_rows_that_never_come_hold_no_worker(cloud):
    """30 devices ask for a position they never upload, against one worker; a real device is served in time."""
    broker, loaded = cloud
    sock = _dealer(broker.request_address, _hostile(broker))
    sessions = {}
    for device in range(100, 130):
        sock.send_multipart(_hello_as(loaded, device, 1, instance=device))
        sessions[device] = _reply(sock, 10_000).session
    for device, session in sessions.items():
        sock.send_multipart([b"", *ep.Decide(device, 2, session, 50).to_frames()])
    for seq in range(3, 9):  # one device's burst: past its limit of requests in the cloud
        sock.send_multipart([b"", *ep.Decide(100, seq, sessions[100], 50).to_frames()])
    prompt = [11, 22, 33, 44, 55]
    with _bob(loaded, broker, timeout=1.5, max_timeouts=100) as client:
        result = client.generate(prompt)
    assert result.token_ids == hf_greedy(loaded.model, prompt, 12)
    assert (result.stats.cloud_tokens, result.stats.timeouts, result.stats.fallback_tokens) == (12, 0, 0)
    replies = [r for r in iter(lambda: _reply(sock, 8000), None)]
    sock.close(0)
    codes = [r.code for r in replies]
    assert codes.count(ErrorCode.MISSING) >= 30 and codes.count(ErrorCode.BUSY) >= 2, codes
