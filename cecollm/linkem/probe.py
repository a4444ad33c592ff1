"""Measure a link on loopback: a small probe server, ping and bulk transfers, direct and through an emulator.

The probe server speaks one tiny protocol: a client opens with a command byte and an 8-byte length,
    E: echo every byte until the client closes;  S: read LENGTH bytes, answer b"K";  G: send LENGTH bytes.
`measure_link(profile)` reports what the emulator delivers for a profile next to its settings, and
`measure_link(LinkProfile())` (a perfect link) what the emulator itself adds: the harness subtracts or
reports that.
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time
from dataclasses import asdict, dataclass

from cecollm.linkem.emulator import LinkEmulator
from cecollm.linkem.profile import Endpoint, Forward, LinkProfile

ECHO, SINK, SOURCE = b"E", b"S", b"G"
_HEADER = struct.Struct(">cQ")  # command, length
_CHUNK = 256 * 1024
IO_TIMEOUT_S = 30.0  # no probe socket waits longer than this: a broken link fails, it does not hang


class ProbeServer:
    """Echo, sink and source on 127.0.0.1, one thread per connection; start()/stop() or `with`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._listener = socket.create_server((host, port))
        self.endpoint = Endpoint(host, self._listener.getsockname()[1])
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> ProbeServer:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping = True
        _shut(self._listener)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shut(conn)
        for t in self._threads:
            t.join(5.0)

    def __enter__(self) -> ProbeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name="linkem-probe", daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(IO_TIMEOUT_S)
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            command, length = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
            if command == ECHO:
                while data := conn.recv(_CHUNK):
                    conn.sendall(data)
            elif command == SINK:
                _recv_exact(conn, length, keep=False)
                conn.sendall(b"K")
            elif command == SOURCE:
                _send_zeros(conn, length)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(_CHUNK):  # wait for the client's close
                pass
        except (OSError, EOFError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _recv_exact(conn: socket.socket, n: int, keep: bool = True) -> bytes:
    parts, left = [], n
    while left:
        data = conn.recv(min(left, _CHUNK))
        if not data:
            raise EOFError(f"the peer closed with {left} of {n} bytes still to come")
        if keep:
            parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _send_zeros(conn: socket.socket, n: int) -> None:
    block = bytes(_CHUNK)
    while n:
        conn.sendall(block[:min(n, _CHUNK)])
        n -= min(n, _CHUNK)


def connect(endpoint: Endpoint, command: bytes, length: int = 0) -> socket.socket:
    """A probe connection, its command sent."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_HEADER.pack(command, length))
    return sock


def ping(endpoint: Endpoint, samples: int = 20, size: int = 64) -> list[float]:
    """Round-trip times (s) of `size`-byte messages echoed over one connection (after one warm-up)."""
    payload = bytes(size)
    with connect(endpoint, ECHO) as sock:
        times = []
        for _ in range(samples + 1):
            t0 = time.perf_counter()
            sock.sendall(payload)
            _recv_exact(sock, size)
            times.append(time.perf_counter() - t0)
        return times[1:]


def upload(endpoint: Endpoint, nbytes: int) -> float:
    """Seconds from the first byte sent until the server confirms it has all `nbytes`."""
    with connect(endpoint, SINK, nbytes) as sock:
        t0 = time.perf_counter()
        _send_zeros(sock, nbytes)
        _recv_exact(sock, 1)
        return time.perf_counter() - t0


def download(endpoint: Endpoint, nbytes: int) -> float:
    """Seconds from the request until the last of `nbytes` bytes from the server has arrived."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=IO_TIMEOUT_S)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        sock.sendall(_HEADER.pack(SOURCE, nbytes))
        _recv_exact(sock, nbytes, keep=False)
        return time.perf_counter() - t0


@dataclass(frozen=True)
class LinkMeasurement:
    """A profile's settings next to what a loopback probe measured through the emulator (ms, Mbit/s)."""

    profile: str  # the profile's one-line description
    expected_rtt_ms: float  # up + down latency of the profile
    direct_rtt_ms: float  # median loopback RTT without the emulator
    linked_rtt_ms: float  # median loopback RTT through the emulator
    excess_rtt_ms: float  # linked - expected - direct: what the emulator adds to a round trip
    late_ms: float  # of that, the mean lateness of the emulator's deliveries while pinging (timer wake-ups)
    bulk_bytes: int  # size of each bulk transfer
    expected_up_mbit: float  # the profile's up rate (0 = unlimited)
    up_mbit: float  # bulk upload rate through the emulator, one RTT taken off the time
    expected_down_mbit: float  # the profile's down rate (0 = unlimited)
    down_mbit: float  # bulk download rate through the emulator, one RTT taken off the time
    direct_up_mbit: float  # the same uploads without the emulator
    direct_down_mbit: float  # the same downloads without the emulator

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        def rate(expected):
            return f"{expected:g}" if expected else "unlimited"
        return (f"{self.profile}\n"
                f"  RTT     expected {self.expected_rtt_ms:.3f} ms, measured {self.linked_rtt_ms:.3f} ms "
                f"(direct loopback {self.direct_rtt_ms:.3f} ms; emulator adds {self.excess_rtt_ms:+.3f} ms, "
                f"{self.late_ms:.3f} ms of it per delivery in waking late)\n"
                f"  up      expected {rate(self.expected_up_mbit)} Mbit/s, measured {self.up_mbit:.1f} Mbit/s "
                f"(direct {self.direct_up_mbit:.0f})\n"
                f"  down    expected {rate(self.expected_down_mbit)} Mbit/s, measured {self.down_mbit:.1f} Mbit/s "
                f"(direct {self.direct_down_mbit:.0f})\n"
                f"  ({self.bulk_bytes} bytes per transfer)")


def _rate_mbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / max(seconds, 1e-9) / 1e6


def measure_link(profile: LinkProfile = LinkProfile(), samples: int = 30, bulk_bytes: int | None = None,
                 bulk_seconds: float = 0.5) -> LinkMeasurement:
    """Ping and bulk-transfer through an emulator with `profile`, and directly, on 127.0.0.1.

    Bulk transfers are sized to take about `bulk_seconds` at the slower profile rate (16 MiB when
    unlimited) unless `bulk_bytes` is given; the median of 3 runs of each is used.
    """
    rates = [r for r in (profile.up.bytes_per_second, profile.down.bytes_per_second) if r]
    nbytes = bulk_bytes or int(min(rates) * bulk_seconds if rates else 16 << 20)
    with ProbeServer() as server:
        direct_rtt = statistics.median(ping(server.endpoint, samples))
        direct_up = statistics.median(upload(server.endpoint, nbytes) for _ in range(3))
        direct_down = statistics.median(download(server.endpoint, nbytes) for _ in range(3))
        with LinkEmulator([Forward(Endpoint("127.0.0.1", 0), server.endpoint)], profile) as link:
            via = link.listening[0]
            rtt = statistics.median(ping(via, samples))
            pinged = link.stats()
            up = statistics.median(upload(via, nbytes) for _ in range(3))
            down = statistics.median(download(via, nbytes) for _ in range(3))
    expected = profile.rtt_ms
    return LinkMeasurement(
        profile=profile.describe(), expected_rtt_ms=expected, direct_rtt_ms=1e3 * direct_rtt,
        linked_rtt_ms=1e3 * rtt, excess_rtt_ms=1e3 * (rtt - direct_rtt) - expected,
        late_ms=1e3 * (pinged.up.late_s + pinged.down.late_s) / max(1, pinged.up.writes + pinged.down.writes),
        bulk_bytes=nbytes,
        expected_up_mbit=profile.up.bandwidth_mbit, up_mbit=_rate_mbit(nbytes, up - rtt),
        expected_down_mbit=profile.down.bandwidth_mbit, down_mbit=_rate_mbit(nbytes, down - rtt),
        direct_up_mbit=_rate_mbit(nbytes, direct_up - direct_rtt),
        direct_down_mbit=_rate_mbit(nbytes, direct_down - direct_rtt))


def measure_overhead(samples: int = 30) -> LinkMeasurement:
    """What the emulator itself adds on a perfect link (no delay, no rate limit)."""
    return measure_link(LinkProfile(name="none"), samples=samples)
