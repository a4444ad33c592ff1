"""The link emulator: it delays and throttles what its settings say, keeps TCP streams intact, closes cleanly.

Every check is against the emulator's own settings (tens of ms, generous bounds), on 127.0.0.1 only;
every socket has a timeout, so a broken emulator fails a test instead of hanging it.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import orjson
import pytest
import zmq
from click.testing import CliRunner

from cecollm.errors import UserError
from cecollm.linkem import (
    PRESETS,
    DelayLine,
    DirectionStats,
    Endpoint,
    Forward,
    LinkEmulator,
    LinkProfile,
    PathProfile,
    ProbeServer,
    measure_link,
    parse_endpoint,
    parse_forward,
    resolve_profile,
)
from cecollm.linkem.delayline import DirectionCounters
from cecollm.linkem.probe import download, ping, upload

TIMEOUT_S = 10.0
SLACK_S = 0.050  # what the emulator may add on top of a delay it was told to apply


def link_to(target: Endpoint, profile: LinkProfile) -> LinkEmulator:
    return LinkEmulator([Forward(Endpoint("127.0.0.1", 0), target)], profile)


def path(latency_ms=0.0, bandwidth_mbit=0.0, jitter_ms=0.0) -> PathProfile:
    return PathProfile(latency_ms=latency_ms, bandwidth_mbit=bandwidth_mbit, jitter_ms=jitter_ms)


def client(endpoint: Endpoint) -> socket.socket:
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the peer's end of stream."""
    parts = []
    while data := sock.recv(65536):
        parts.append(data)
    return b"".join(parts)


class OneShotServer:
    """Accepts one connection on 127.0.0.1 and runs `handler(conn)` on it in a thread."""

    def __init__(self, handler) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT_S)
        self.endpoint = Endpoint("127.0.0.1", self._listener.getsockname()[1])
        self.result = None
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(handler,), daemon=True)
        self._thread.start()

    def _run(self, handler) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(TIMEOUT_S)
                self.result = handler(conn)
        except Exception as exc:  # reported by join()
            self.error = exc
        finally:
            self._listener.close()

    def join(self):
        self._thread.join(TIMEOUT_S)
        assert not self._thread.is_alive(), "the test server did not finish"
        if self.error is not None:
            raise self.error
        return self.result


# -- profiles, presets, addresses --------------------------------------------------------------

def test_presets_are_the_issues_links():
    for name, rtt, mbit in (("lan", 1.0, 1000.0), ("wifi", 10.0, 100.0), ("wan", 50.0, 20.0)):
        p = PRESETS[name]
        assert p.rtt_ms == rtt and p.up == p.down
        assert p.up.latency_ms == rtt / 2 and p.up.bandwidth_mbit == mbit and p.up.jitter_ms == 0


def test_explicit_values_override_preset_fields():
    p = resolve_profile("wan", latency_ms=(5.0, 5.0), jitter_ms=(1.0, 3.0))
    assert p.name == "wan+custom" and p.rtt_ms == 10.0
    assert p.up == path(5.0, 20.0, 1.0) and p.down == path(5.0, 20.0, 3.0)
    q = resolve_profile(None, bandwidth_mbit=(10.0, 50.0), seed=7)
    assert q.up == path(0, 10.0) and q.down == path(0, 50.0) and q.seed == 7
    assert resolve_profile("wifi") == PRESETS["wifi"]
    assert resolve_profile() == LinkProfile()


@pytest.mark.parametrize("make", [
    lambda: resolve_profile("dialup"),
    lambda: resolve_profile(None, latency_ms=(-1.0, 0.0)),
    lambda: PathProfile(bandwidth_mbit=float("nan")),
    lambda: PathProfile(jitter_ms=-0.5),
    lambda: PathProfile(latency_ms=10 ** 9),
    lambda: LinkProfile(packet_bytes=0),
    lambda: LinkProfile(packet_bytes=2000, queue_bytes=1000),
])
def test_bad_profiles_are_user_errors(make):
    with pytest.raises(UserError):
        make()


def test_endpoints_and_forwards_parse():
    assert parse_endpoint("10.0.0.2:5555") == Endpoint("10.0.0.2", 5555)
    assert parse_endpoint("tcp://localhost:80") == Endpoint("localhost", 80)
    assert parse_endpoint(":6555") == Endpoint("127.0.0.1", 6555)
    assert parse_endpoint("[::1]:7") == Endpoint("::1", 7)
    assert parse_endpoint("*:0", listening=True) == Endpoint("0.0.0.0", 0)
    assert str(Endpoint("::1", 7)) == "[::1]:7"
    assert parse_forward(":6555=tcp://127.0.0.1:5555") == Forward(Endpoint("127.0.0.1", 6555),
                                                                 Endpoint("127.0.0.1", 5555))
    for bad in ("nohost", "host:", "host:99999", "host:-1", ":0", "ipc:///tmp/x", "[zz]:5", "::1:5", "*:5"):
        with pytest.raises(UserError):
            parse_endpoint(bad)
    for bad in ("a:1", "=a:1", "a:1="):
        with pytest.raises(UserError):
            parse_forward(bad)


# -- the schedule, without sockets --------------------------------------------------------------

def make_line(p: PathProfile, packet_bytes=1000, seed=0) -> DelayLine:
    return DelayLine(p, packet_bytes, 1 << 20, random.Random(seed), DirectionCounters(), time.monotonic)


def test_schedule_charges_serialization_by_bytes_then_latency():
    line = make_line(path(latency_ms=20.0, bandwidth_mbit=8.0))  # 1e6 bytes/s: 1 ms per 1000 bytes
    arrivals = line.schedule(bytes(10_000), now=100.0)
    assert arrivals == pytest.approx([100.0 + 0.020 + 0.001 * (i + 1) for i in range(10)])
    later = line.schedule(bytes(500), now=100.004)  # queued behind the first 10 000 bytes
    assert later == pytest.approx([100.0 + 0.010 + 0.0005 + 0.020])
    idle = line.schedule(bytes(500), now=200.0)  # the link is free again
    assert idle == pytest.approx([200.0 + 0.0005 + 0.020])
    assert line.queued_bytes == 11_000


def test_jitter_is_bounded_and_never_reorders():
    line = make_line(path(latency_ms=5.0, bandwidth_mbit=100.0, jitter_ms=30.0), packet_bytes=100, seed=3)
    arrivals = line.schedule(os.urandom(200_000), now=0.0)
    sent = [0.005 + 100 * (i + 1) / 12.5e6 for i in range(2000)]
    assert all(b >= a for a, b in zip(arrivals, arrivals[1:])), "arrivals went back in time"
    extra = [a - s for a, s in zip(arrivals, sent)]
    assert min(extra) >= -1e-9 and max(extra) <= 0.030 + 1e-9
    assert statistics.pstdev(extra[:20]) > 0.001, "the jitter drew no spread"


# -- delays and rates through real sockets -------------------------------------------------------

def test_round_trip_takes_twice_the_one_way_latency():
    with ProbeServer() as server, link_to(server.endpoint, resolve_profile(latency_ms=(20.0, 20.0))) as link:
        rtts = ping(link.listening[0], samples=8)
        stats = link.stats()
    assert min(rtts) >= 0.9 * 0.040
    assert statistics.median(rtts) < 0.040 + SLACK_S
    # time on the wire, measured when the bytes are delivered: one latency per ping each way, not less
    for direction in (stats.up, stats.down):
        assert 8 * 0.9 * 0.020 <= direction.transit_s < 8 * (0.020 + SLACK_S), direction
    # the link as a whole: pings go up, then down, never both at once, so the union is the sum
    assert stats.busy_s == pytest.approx(stats.up.transit_s + stats.down.transit_s, rel=0.05)


def test_time_on_the_wire_counts_overlapping_directions_once():
    """An echo of a large payload keeps both directions busy at once: the union is far below the sum."""
    profile = resolve_profile(latency_ms=(20.0, 20.0), bandwidth_mbit=(16.0, 16.0))  # 2 MB/s each way
    with ProbeServer() as server, link_to(server.endpoint, profile) as link:
        t0 = time.perf_counter()
        echo_through(link.listening[0], os.urandom(400_000))  # ~0.2 s serializing each way, overlapped
        elapsed = time.perf_counter() - t0
        stats = link.stats()
    assert stats.up.transit_s >= 0.9 * 0.2 and stats.down.transit_s >= 0.9 * 0.2
    # how much the directions overlap depends on when the echo starts (a loaded machine delays it): some do
    assert max(stats.up.transit_s, stats.down.transit_s) <= stats.busy_s < stats.up.transit_s + stats.down.transit_s
    assert 0.9 * 0.24 <= stats.busy_s <= elapsed


def test_latency_is_set_per_direction():
    """One-way times, stamped on both ends with the same clock: up 5 ms, down 30 ms."""
    def serve(conn):
        conn.recv(1)
        arrived = time.perf_counter()
        sent = time.perf_counter()
        conn.sendall(b"d")
        conn.recv(1)
        return arrived, sent

    server = OneShotServer(serve)
    with link_to(server.endpoint, resolve_profile(latency_ms=(5.0, 30.0))) as link:
        with client(link.listening[0]) as sock:
            t0 = time.perf_counter()
            sock.sendall(b"u")
            assert sock.recv(1) == b"d"
            t3 = time.perf_counter()
            sock.sendall(b"x")
            arrived, sent = server.join()
    up, down = arrived - t0, t3 - sent
    assert 0.9 * 0.005 <= up < 0.005 + SLACK_S
    assert 0.9 * 0.030 <= down < 0.030 + SLACK_S


def test_bandwidth_throttles_each_direction_on_its_own():
    profile = resolve_profile(bandwidth_mbit=(16.0, 4.0))  # 2 MB/s up, 0.5 MB/s down
    n = 400_000
    with ProbeServer() as server, link_to(server.endpoint, profile) as link:
        up = upload(link.listening[0], n)
        down = download(link.listening[0], n)
        stats = link.stats()
    expected_up, expected_down = n * 8 / 16e6, n * 8 / 4e6  # 0.2 s and 0.8 s
    assert 0.9 * expected_up <= up < 1.5 * expected_up + SLACK_S
    assert 0.9 * expected_down <= down < 1.5 * expected_down + SLACK_S
    assert stats.up.bytes_out >= n and stats.down.bytes_out >= n
    assert stats.up.serialization_s == pytest.approx(stats.up.bytes_in * 8 / 16e6, rel=1e-6)
    assert stats.down.serialization_s == pytest.approx(stats.down.bytes_in * 8 / 4e6, rel=1e-6)


def test_a_small_queue_still_carries_everything():
    """A queue smaller than what is sent holds the sender back; no byte is lost."""
    profile = LinkProfile(up=path(1.0, 80.0), down=path(1.0, 80.0), packet_bytes=1000, queue_bytes=8000)
    payload = os.urandom(300_000)
    with ProbeServer() as server, link_to(server.endpoint, profile) as link:
        assert echo_through(link.listening[0], payload) == payload


def echo_through(endpoint: Endpoint, payload: bytes) -> bytes:
    """Send `payload` to the echo probe (from a thread, so both directions flow) and read it back."""
    from cecollm.linkem.probe import ECHO, connect

    with connect(endpoint, ECHO) as sock:
        def send():
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = recv_all(sock)
        sender.join(TIMEOUT_S)
    return received


def test_jitter_never_reorders_bytes():
    profile = LinkProfile(up=path(2.0, 200.0, 15.0), down=path(2.0, 200.0, 15.0), packet_bytes=512, seed=11)
    payload = os.urandom(2_000_000)
    with ProbeServer() as server, link_to(server.endpoint, profile) as link:
        received = echo_through(link.listening[0], payload)
        rtts = ping(link.listening[0], samples=10)
        stats = link.stats()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert stats.up.jitter_s > 0 and stats.down.jitter_s > 0
    assert stats.up.max_delay_s >= 0.002
    assert all(0.9 * 0.004 <= r < 0.004 + 0.030 + SLACK_S for r in rtts)
    assert statistics.pstdev(rtts) > 0.0005, "ping times show no jitter"


# -- ZeroMQ through the link ---------------------------------------------------------------------

def test_zeromq_req_rep_and_push_pull_share_one_link():
    ctx = zmq.Context()
    sockets = []

    def sock(kind):
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
        s.setsockopt(zmq.SNDTIMEO, int(TIMEOUT_S * 1000))
        sockets.append(s)
        return s

    try:
        rep, pull = sock(zmq.REP), sock(zmq.PULL)
        rep_port = rep.bind_to_random_port("tcp://127.0.0.1")
        pull_port = pull.bind_to_random_port("tcp://127.0.0.1")
        forwards = [parse_forward(f"127.0.0.1:0=127.0.0.1:{rep_port}"),
                    parse_forward(f"127.0.0.1:0=127.0.0.1:{pull_port}")]
        with LinkEmulator(forwards, resolve_profile(latency_ms=(10.0, 10.0), bandwidth_mbit=(100.0, 100.0))) as link:
            req, push = sock(zmq.REQ), sock(zmq.PUSH)
            req.connect(f"tcp://{link.listening[0]}")
            push.connect(f"tcp://{link.listening[1]}")
            big = os.urandom(100_000)
            times = []
            for i in range(4):
                t0 = time.perf_counter()
                req.send_multipart([b"%d" % i, big])
                assert rep.recv_multipart() == [b"%d" % i, big]
                rep.send(b"ok %d" % i)
                assert req.recv() == b"ok %d" % i
                times.append(time.perf_counter() - t0)
            for i in range(50):
                push.send(b"m%d" % i)
            assert [pull.recv() for _ in range(50)] == [b"m%d" % i for i in range(50)]
            stats = link.stats()
        # 100 kB at 100 Mbit/s is 8 ms on top of the 20 ms round trip
        assert min(times[1:]) >= 0.9 * (0.020 + 0.008)
        assert statistics.median(times[1:]) < 0.028 + SLACK_S
        req_fw, push_fw = stats.forwards
        assert req_fw.up.bytes_out > 400_000 and req_fw.down.bytes_out > 0
        assert push_fw.up.bytes_out > 50 * 3 and push_fw.accepted == 1
    finally:
        for s in sockets:
            s.close()
        ctx.term()


# -- closing ---------------------------------------------------------------------------------------

def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_client_close_reaches_the_target():
    server = OneShotServer(lambda conn: recv_all(conn))
    with link_to(server.endpoint, resolve_profile(latency_ms=(5.0, 5.0))) as link:
        with client(link.listening[0]) as sock:
            sock.sendall(b"last words")
        assert server.join() == b"last words"
        wait_for(lambda: link.stats().forwards[0].active == 0, "the relay to close")


def test_target_close_reaches_the_client():
    def serve(conn):
        conn.sendall(b"bye")

    server = OneShotServer(serve)
    with link_to(server.endpoint, resolve_profile(latency_ms=(5.0, 5.0))) as link:
        with client(link.listening[0]) as sock:
            assert recv_all(sock) == b"bye"
        server.join()
        wait_for(lambda: link.stats().forwards[0].active == 0, "the relay to close")


def test_half_close_lets_the_answer_through():
    with ProbeServer() as server, link_to(server.endpoint, resolve_profile(latency_ms=(3.0, 3.0))) as link:
        assert echo_through(link.listening[0], b"x" * 10_000) == b"x" * 10_000


def test_an_unreachable_target_closes_the_client():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        dead = Endpoint("127.0.0.1", probe.getsockname()[1])
    with link_to(dead, LinkProfile()) as link:
        with client(link.listening[0]) as sock:
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: link.stats().forwards[0].refused == 1, "the refusal to be counted")


def test_stop_closes_open_connections():
    with ProbeServer() as server:
        link = link_to(server.endpoint, LinkProfile()).start()
        from cecollm.linkem.probe import ECHO, connect

        with connect(link.listening[0], ECHO) as sock:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            link.stop()
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass


def test_a_busy_listening_port_is_a_user_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match="cannot listen"):
            LinkEmulator([parse_forward(f"127.0.0.1:{port}=127.0.0.1:9")]).start()


def test_measure_link_reports_the_profile():
    m = measure_link(resolve_profile(latency_ms=(10.0, 10.0), bandwidth_mbit=(40.0, 40.0)), samples=5,
                     bulk_seconds=0.15)
    assert m.expected_rtt_ms == 20.0 and 0.9 * 20.0 <= m.linked_rtt_ms < 20.0 + 1e3 * SLACK_S
    assert 0.5 * 40 <= m.up_mbit <= 1.1 * 40 and 0.5 * 40 <= m.down_mbit <= 1.1 * 40


# -- the command -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--listen", "nohost", "--target", "127.0.0.1:5555"], "bad address"),
    (["--forward", "127.0.0.1:0=127.0.0.1:70000"], "bad address"),
    (["--forward", "127.0.0.1:0"], "LISTEN=TARGET"),
    (["--listen", "127.0.0.1:0"], "go together"),
    (["--preset", "dialup", "--forward", ":0=:5555"], "unknown preset"),
    (["--latency-ms", "-5", "--forward", ":0=:5555"], ">= 0"),
    (["--bandwidth-mbit", "10:20:30", "--forward", ":0=:5555"], "UP:DOWN"),
    (["--seed", "x", "--forward", ":0=:5555"], "--seed"),
    (["--packet-bytes", "0", "--forward", ":0=:5555"], "--packet-bytes"),
    ([], "nothing to forward"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    from cecollm.cli import cli

    result = CliRunner().invoke(cli, ["linkem", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_relays_until_a_signal_then_stops_cleanly(sig, tmp_path):
    stats_path = tmp_path / "stats.json"
    code = "from cecollm.linkem.cli import linkem; linkem(prog_name='cecollm linkem')"
    with ProbeServer() as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "--preset", "wifi", "--forward", f"127.0.0.1:0={server.endpoint}",
             "--forward", f"127.0.0.1:0={server.endpoint}", "--stats", str(stats_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+) ->", line)]
            assert len(ports) == 2 and "wifi" in line and "RTT 10 ms" in line, line
            for port in ports:
                rtts = ping(Endpoint("127.0.0.1", port), samples=3)
                assert min(rtts) >= 0.9 * 0.010
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "linkem stopped: 2 connections" in err
    stats = orjson.loads(stats_path.read_bytes())
    header = 9  # the probe's command and length, sent up only
    assert stats["profile"] == "wifi"
    assert stats["up"]["bytes_out"] == stats["down"]["bytes_out"] + 2 * header > 2 * header
    assert [f["accepted"] for f in stats["forwards"]] == [1, 1]


def test_reset_stats_counts_from_zero():
    with ProbeServer() as server, link_to(server.endpoint, resolve_profile(latency_ms=(1.0, 1.0))) as link:
        ping(link.listening[0], samples=3, size=100)
        assert link.stats().up.bytes_out == 9 + 4 * 100
        link.reset_stats()
        assert link.stats().up == link.stats().down == DirectionStats()
        assert link.stats().forwards[0].accepted == 0
        ping(link.listening[0], samples=1, size=50)
        stats = link.stats()
    assert stats.up.bytes_out == stats.up.bytes_in == 9 + 2 * 50 and stats.down.bytes_out == 2 * 50
    assert stats.forwards[0].accepted == 1 and 2 <= stats.up.packets <= 3  # the header may ride with a ping


def test_cli_measure_prints_the_profile_next_to_its_settings():
    from cecollm.linkem.cli import linkem

    result = CliRunner().invoke(linkem, ["--measure", "--latency-ms", "3:7", "--bandwidth-mbit", "50"])
    assert result.exit_code == 0, result.output
    assert "custom: RTT 10 ms (up 3 ms, 50 Mbit/s; down 7 ms, 50 Mbit/s)" in result.output
    rtt = float(re.search(r"RTT +expected 10\.000 ms, measured ([\d.]+) ms", result.output).group(1))
    up = float(re.search(r"up +expected 50 Mbit/s, measured ([\d.]+) Mbit/s", result.output).group(1))
    assert 9.0 <= rtt < 10.0 + 1e3 * SLACK_S and 25.0 <= up <= 55.0
