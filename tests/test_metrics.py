"""The broker's Prometheus metrics (`cecollm-broker --metrics`): a live broker serving one generation and
hostile requests, scraped over HTTP; the content manager's counts across its restart; the routing loop's
counts with fake sockets; a bad address."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import zmq
from prometheus_client.parser import text_string_to_metric_families

from cecollm.broker.launch import BrokerProcess
from cecollm.edge.client import EdgeClient, EdgeConfig
from cecollm.edge.heads import HeadSet
from cecollm.runtime import free_ports
from cecollm.split import Split
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.security import ClientKeys
from cecollm.wire.wire import ErrorCode, Frames

from conftest import Collect, frames_of, hf_greedy

EXITS = (2, 4)
PROMPT = [5, 17, 33, 2, 9]
N = 8  # tokens per generation
BUDGET_MB = 2  # holds one device's state of the tiny model at --capacity 1024, not two: a second evicts the first
HANG_GUARD = 60.0  # seconds a wait for the metrics to show something may take before the test fails


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def broker(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "broker.log"
    port = free_ports(1)[0]
    extra = ["--exits", "2,4", "--metrics", f"127.0.0.1:{port}", "--budget-mb", str(BUDGET_MB), "--capacity", "1024",
             "--heartbeat-ms", "100"]
    with BrokerProcess(str(model_dir), workers=1, extra=extra, log_path=log) as b:
        b.log_path, b.metrics_url = log, f"http://127.0.0.1:{port}/metrics"
        yield b


def scrape(url: str) -> dict:
    """Every sample of a scrape: (name, labels as sorted pairs) -> value."""
    with urllib.request.urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """A sample that must be there (a KeyError names a metric that is not exported)."""
    return samples[name, tuple(sorted(labels.items()))]


def wait_for(url: str, condition, what: str) -> dict:
    """Scrape until `condition(samples)` holds (the content manager's part comes twice a second); the samples."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        samples = scrape(url)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"the metrics never showed {what}: {sorted(k for k in samples if k[0].startswith('cecollm'))}")
        time.sleep(0.1)


def _client(loaded, broker, device: int) -> EdgeClient:
    split = Split.create(loaded.n_layers, EXITS)
    config = EdgeConfig(exact=False, device_id=device, broker=broker.request_address, upload=broker.upload_address,
                        keys=broker.device_keys, threshold=1.0, max_new_tokens=N, timeout=20.0)
    return EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, split.exits), config)


def _socket(kind, address: str, keys: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 2000)
    ClientKeys.load(keys).secure(sock)
    sock.connect(address)
    return sock


def _ask(sock: zmq.Socket, frames: list):
    """Send a request on the edge socket; the broker's reply, parsed."""
    sock.send_multipart([b"", *frames])
    assert sock.poll(60_000), "the broker answers every request"
    return ep.parse(sock.recv_multipart()[1:])


def test_counts_match_a_generation_and_hostile_requests(loaded, broker):
    url = broker.metrics_url
    assert broker.info["metrics"] == url  # READY names it, as the startup line does
    start = scrape(url)
    assert value(start, "cecollm_shm_budget_bytes") == BUDGET_MB << 20
    assert value(start, "cecollm_active_devices") == 0 and value(start, "cecollm_shm_used_bytes") == 0

    # a session that is opened and left idle: the generation's device needs its room (the budget holds one)
    edge = _socket(zmq.DEALER, broker.request_address, broker.device_keys)
    welcome = _ask(edge, ep.Hello(50, 1, loaded.identity, loaded.n_layers, EXITS, 4, "float32", "float16", False, 77).to_frames())
    assert isinstance(welcome, ep.Welcome)
    one = value(wait_for(url, lambda s: value(s, "cecollm_active_devices") == 1, "the idle session"),
                "cecollm_shm_used_bytes")
    assert 0 < one <= BUDGET_MB << 20 < 2 * one  # the next device evicts this one

    seen = []

    def look(record) -> None:  # while the generation's session is open (the edge waits here)
        if not seen:
            seen.append(wait_for(url, lambda s: value(s, "cecollm_evictions_total", reason="budget") == 1,
                                 "the eviction"))

    with _client(loaded, broker, 1) as client:
        result = client.generate(PROMPT, look)
    assert result.token_ids == hf_greedy(loaded.model, PROMPT, N)
    assert (result.stats.cloud_tokens, result.stats.fallback_tokens) == (N, 0)
    during = seen[0]  # the generation's device took the evicted one's place
    assert value(during, "cecollm_active_devices") == 1 and value(during, "cecollm_shm_used_bytes") == one

    # hostile and bad requests: an unreadable frame, a DECIDE with a bad body, a DECIDE of the evicted session
    junk = _ask(edge, [b"junk"])
    bad = _ask(edge, [ep.Decide(1, 2, 3, 4).to_frames()[0], b"\x93\x01"])
    gone = _ask(edge, ep.Decide(50, 2, welcome.session, 3).to_frames())
    assert [m.code for m in (junk, bad, gone)] == [ErrorCode.MALFORMED, ErrorCode.MALFORMED, ErrorCode.UNKNOWN_DEVICE]
    edge.close()
    # on the upload socket: an unreadable frame, rows for a session that is not open
    push = _socket(zmq.PUSH, broker.upload_address, broker.device_keys)
    push.send_multipart([b"junk"])
    rows = torch.zeros(1, loaded.model.config.hidden_size, dtype=torch.float16).numpy()
    push.send_multipart(ep.Upload(50, welcome.session, 0, 0, rows).to_frames())
    push.close()

    done = wait_for(url, lambda s: value(s, "cecollm_active_devices") == 0
                    and value(s, "cecollm_upload_messages_total", result="refused") >= 2, "the end of it all")
    requests = {(dict(k[1])["command"], dict(k[1])["result"]): v for k, v in done.items()
                if k[0] == "cecollm_edge_requests_total" and v}
    assert requests == {("hello", "ok"): 2, ("decide", "ok"): N, ("decide", "unknown_device"): 1,
                        ("decide", "malformed"): 1, ("other", "malformed"): 1}
    assert value(done, "cecollm_cloud_tokens_total", command="decide") == N == result.stats.cloud_tokens
    assert value(done, "cecollm_cloud_tokens_total", command="verify") == 0
    # the latency of every request that went to a worker: 2 HELLOs, N + 1 DECIDEs
    assert value(done, "cecollm_edge_request_latency_seconds_count", command="hello") == 2
    assert value(done, "cecollm_edge_request_latency_seconds_count", command="decide") == N + 1
    assert value(done, "cecollm_edge_request_latency_seconds_sum", command="decide") > 0
    assert value(done, "cecollm_shm_used_bytes") == 0
    assert value(done, "cecollm_evictions_total", reason="budget") == 1
    assert value(done, "cecollm_evictions_total", reason="idle") == 0
    # the generation's rows went up over the network, float16: prompt and generated positions but the last
    hidden = loaded.model.config.hidden_size
    assert value(done, "cecollm_upload_bytes_total", via="network") == (len(PROMPT) + N - 1) * hidden * 2
    assert value(done, "cecollm_upload_bytes_total", via="shm") == 0
    assert value(done, "cecollm_upload_messages_total", result="refused") == 2
    assert value(done, "cecollm_upload_messages_total", result="ok") >= 2  # rows and the END
    assert {sock: value(done, "cecollm_refused_frames_total", socket=sock)
            for sock in ("requests", "workers", "manager", "uploads", "state")} == \
        {"requests": 2, "workers": 0, "manager": 0, "uploads": 1, "state": 0}
    expired = done.get(("cecollm_parked_request_expiries_total", ()), None)
    assert expired == 0 and value(done, "cecollm_num_requests_parked") == 0  # rows come in time on loopback
    assert value(done, "cecollm_num_requests_waiting") == 0
    assert value(done, "cecollm_worker_restarts_total") == 0
    assert value(done, "cecollm_content_manager_restarts_total") == 0


def test_restarts_are_counted_and_the_content_managers_counts_survive_it(loaded, broker):
    url = broker.metrics_url
    with _client(loaded, broker, 2) as client:
        client.generate(PROMPT)
    before = wait_for(url, lambda s: value(s, "cecollm_active_devices") == 0
                      and value(s, "cecollm_upload_messages_total", result="ok") > 0, "the generation's END")
    taken = value(before, "cecollm_upload_messages_total", result="ok")
    sent = value(before, "cecollm_upload_bytes_total", via="network")
    restarts = value(before, "cecollm_content_manager_restarts_total")
    os.kill(broker.content_manager_pid(), signal.SIGKILL)
    after = wait_for(url, lambda s: value(s, "cecollm_content_manager_restarts_total") == restarts + 1,
                     "the content manager's restart")
    # what the dead one counted is kept (counters never go down); its sessions are gone
    assert value(after, "cecollm_upload_messages_total", result="ok") == taken
    assert value(after, "cecollm_upload_bytes_total", via="network") == sent
    assert value(after, "cecollm_active_devices") == 0 and value(after, "cecollm_shm_used_bytes") == 0
    with _client(loaded, broker, 2) as client:  # the new one counts on from there
        assert client.generate(PROMPT).token_ids == hf_greedy(loaded.model, PROMPT, N)
    wait_for(url, lambda s: value(s, "cecollm_active_devices") == 0
             and value(s, "cecollm_upload_bytes_total", via="network") == 2 * sent, "the new content manager's counts")

    worker = int(re.findall(r"worker (\d+) ready \(", broker.log_path.read_text())[-1])
    os.kill(worker, signal.SIGKILL)
    replaced = wait_for(url, lambda s: value(s, "cecollm_worker_restarts_total") == 1
                        and value(s, "cecollm_workers_dropped_total", reason="silent") == 1, "the worker's restart")
    assert value(replaced, "cecollm_workers_dropped_total", reason="hung") == 0


# ---- the routing loop's counts, with fake sockets -------------------------------------------
def _samples(metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.text().decode()) for s in family.samples}


def test_the_routing_loop_counts_busy_missing_hung_and_a_bad_worker():
    from cecollm.broker.router import Broker
    from cecollm.wire import broker_worker as wp

    front, back, state = Collect(), Collect(), Collect()
    broker = Broker(front, back, wp.Config("/m", "id", "float32", (2,), 2, "ipc:///x", 250, 4), state=state, wait_seconds=2.0,
                    job_seconds=0.5, max_per_device=1)
    for worker, pid in ((b"w1", 11), (b"w2", 12)):
        broker.on_worker(frames_of(worker, *wp.Connect(pid).to_frames()))
        broker.on_worker(frames_of(worker, *wp.Ready().to_frames()))
    broker.on_edge(frames_of(b"edge", b"", *ep.Decide(7, 1, 99, 12).to_frames()))
    broker.on_edge(frames_of(b"edge", b"", *ep.Decide(7, 2, 99, 13).to_frames()))  # one per device: busy
    broker.dispatch()
    broker.on_worker(frames_of(b"w1", *wp.Defer(1).to_frames()))  # its rows are not in: parked
    assert value(_samples(broker.metrics), "cecollm_num_requests_parked") == 1
    broker.expire_parked(time.monotonic() + 3)  # they never came: MISSING
    broker.on_edge(frames_of(b"edge", b"", *ep.Verify(8, 1, 5, 0, 3).to_frames()))
    broker.dispatch()
    token = ep.Token(3, 42, 0.9, 8, 1, 0.01).to_frames()
    broker.on_worker(frames_of(b"w2", *wp.Reply(2, Frames(token)).to_frames()))  # w2 was free longest
    broker.on_worker(frames_of(b"w2", b"junk"))  # a worker's unreadable message
    broker.on_state([b"", b"junk"])  # and the content manager's
    broker.on_edge(frames_of(b"edge", b"", *ep.Hello(9, 1, "id", 6, EXITS, 4, "float32", "float16", False).to_frames()))
    broker.dispatch()  # to w1, free since it deferred job 1
    broker.on_worker(frames_of(b"w1", *wp.Heartbeat().to_frames()))  # it beats, but never answers
    broker.purge(time.monotonic() + 0.7)  # past the job's deadline
    assert broker.hung == [11]
    s = _samples(broker.metrics)
    requests = {(dict(k[1])["command"], dict(k[1])["result"]): v for k, v in s.items()
                if k[0] == "cecollm_edge_requests_total" and v}
    assert requests == {("decide", "busy"): 1, ("decide", "missing"): 1, ("verify", "ok"): 1}
    assert value(s, "cecollm_cloud_tokens_total", command="verify") == 1
    assert value(s, "cecollm_parked_request_expiries_total") == 1 and value(s, "cecollm_num_requests_parked") == 0
    assert value(s, "cecollm_workers_dropped_total", reason="hung") == 1
    assert value(s, "cecollm_num_requests_waiting") == 1  # the HELLO of the dropped worker waits for another
    assert value(s, "cecollm_refused_frames_total", socket="workers") == 1
    assert value(s, "cecollm_refused_frames_total", socket="manager") == 1
    assert value(s, "cecollm_edge_request_latency_seconds_count", command="decide") == 1  # the busy one never queued


def _snapshot(pid: int, devices: int, taken: int) -> sp.Snapshot:
    return sp.Snapshot(pid, devices, devices << 20, 0, 0, taken, 0, 0, taken * 100, 0, 0, 0)


def test_a_dead_content_managers_counts_are_kept_and_its_late_snapshot_ignored():
    from cecollm.broker.metrics import BrokerMetrics

    metrics = BrokerMetrics(budget_bytes=5 << 20)
    metrics.on_snapshot(_snapshot(100, 2, 7))
    metrics.manager_lost(100)
    metrics.on_snapshot(_snapshot(100, 2, 9))  # sent before it died, read after: ignored
    s = _samples(metrics)
    assert value(s, "cecollm_upload_messages_total", result="ok") == 7
    assert value(s, "cecollm_active_devices") == 0 and value(s, "cecollm_shm_used_bytes") == 0
    metrics.on_snapshot(_snapshot(200, 1, 3))  # the new one counts from 0
    metrics.on_snapshot(_snapshot(300, 1, 1))  # another pid without a loss noticed: the last one's counts stay too
    s = _samples(metrics)
    assert value(s, "cecollm_upload_messages_total", result="ok") == 7 + 3 + 1
    assert value(s, "cecollm_upload_bytes_total", via="network") == 1100
    assert value(s, "cecollm_active_devices") == 1 and value(s, "cecollm_shm_used_bytes") == 1 << 20
    assert value(s, "cecollm_shm_budget_bytes") == 5 << 20


class _Replies:
    """The content manager's state socket: keeps its replies, parsed."""

    def __init__(self):
        self.sent = []

    def send_multipart(self, frames, copy=True):
        self.sent.append(sp.parse([bytes(f) for f in frames[2:]]))


def test_the_content_manager_counts_rows_stale_uploads_bad_frames_and_releases():
    import numpy as np

    from cecollm.cache import shm
    from cecollm.cache.content_manager import ContentManager, ContentManagerConfig

    hidden, prefix = 16, f"cecollm-test-metrics-{os.getpid()}-"
    config = ContentManagerConfig("inproc://unused-up", "inproc://unused-state", cloud_layers=2, n_kv_heads=1,
                                  head_dim=8, hidden=hidden, capacity=64, idle_ttl=60.0, segment_prefix=prefix)
    m = ContentManager(config)
    m.state = replies = _Replies()
    try:
        session = m.open(sp.Open(3, 1)).session  # float16 rows

        def upload(msg):
            m.on_upload([bytes(f) for f in msg.to_frames()])

        upload(ep.Upload(3, session, 0, 0, np.ones((2, hidden), np.float16)))  # 2 rows over the network
        upload(ep.UploadShm(3, session, 1, 2, 1))  # 1 row written into the segment
        m.lease(sp.Lease(3, session, 1, 1), b"w1")
        m.on_rollback(sp.Rollback(3, replies.sent[-1].token, 2, 50, 0.9), b"w1")  # epoch 1 from row 2
        upload(ep.Upload(3, session, 2, 3, np.ones((1, hidden), np.float16)))  # of epoch 0: stale
        upload(ep.End(3, session))
        m.on_upload([b"junk"])
        m.on_control(frames_of(b"w1", b"junk"))  # no envelope
        m.on_control(frames_of(b"w1", b"", b"junk"))
        m.open(sp.Open(4, 1))
        m.housekeeping(time.monotonic() + 61)  # device 4 idle past the TTL
        m.on_control(frames_of(b"broker", b"", *sp.Stats().to_frames()))
        assert replies.sent[-1] == sp.Snapshot(
            pid=os.getpid(), devices=0, used_bytes=0, evictions=0, idle_releases=1, uploads_taken=3,
            uploads_refused=1, uploads_stale=1, upload_network_bytes=2 * hidden * 2, upload_shm_bytes=hidden * 2,
            refused_upload_frames=1, refused_state_frames=2)
    finally:
        m.release_all()
        shm.remove_leftovers(prefix)


# ---- a bad address ---------------------------------------------------------------------------
def test_a_bad_metrics_address_is_one_line_before_the_model_loads(tmp_path):
    taken = socket_in_use()
    try:
        for address, says in (("127.0.0.1:http", "give HOST:PORT"), ("127.0.0.1:70000", "give HOST:PORT"),
                              (f"127.0.0.1:{taken.getsockname()[1]}", "cannot listen there"),
                              ("no-such-host.invalid:9100", "unknown host")):
            # a model that does not exist: the address is refused before the broker looks for it
            run = subprocess.run([sys.executable, "-m", "cecollm.broker", "--model", str(tmp_path / "none"),
                                  "--insecure", "--metrics", address], capture_output=True, text=True, timeout=120)
            lines = run.stderr.strip().splitlines()
            assert run.returncode == 2 and len(lines) == 1, run.stderr
            assert f"--metrics {address!r}: {says}" in lines[0] and "model" not in lines[0], lines[0]
    finally:
        taken.close()


def socket_in_use():
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock
