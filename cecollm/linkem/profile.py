"""What the emulated link is: per-direction delay and rate, presets, and the forwards it carries.

"up" is the direction from the listening side to the target (edge -> cloud), "down" the reverse.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, replace

from cecollm.errors import UserError

MAX_DELAY_MS = 60_000.0  # a delay above a minute is a typo, not a link


@dataclass(frozen=True)
class PathProfile:
    """One direction of the link."""

    latency_ms: float = 0.0  # one-way propagation delay (ms); the RTT is up + down latency
    bandwidth_mbit: float = 0.0  # serialization rate in Mbit/s (10^6 bit/s); 0 = unlimited
    jitter_ms: float = 0.0  # bound of a random extra delay per packet, uniform in [0, jitter_ms]; never reorders

    def __post_init__(self) -> None:
        for name, value in (("latency", self.latency_ms), ("bandwidth", self.bandwidth_mbit),
                            ("jitter", self.jitter_ms)):
            if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value) or value < 0:
                raise UserError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.latency_ms + self.jitter_ms > MAX_DELAY_MS:
            raise UserError(f"latency + jitter of {self.latency_ms + self.jitter_ms:g} ms is over {MAX_DELAY_MS:g} ms")

    @property
    def bytes_per_second(self) -> float:
        """Serialization rate; 0.0 means unlimited."""
        return self.bandwidth_mbit * 1e6 / 8.0

    def describe(self) -> str:
        rate = f"{self.bandwidth_mbit:g} Mbit/s" if self.bandwidth_mbit else "unlimited"
        jitter = f" + jitter <= {self.jitter_ms:g} ms" if self.jitter_ms else ""
        return f"{self.latency_ms:g} ms{jitter}, {rate}"


@dataclass(frozen=True)
class LinkProfile:
    """The emulated link, both directions; the defaults are a perfect link (no delay, no rate limit)."""

    name: str = "custom"  # preset name, or "custom"; shown in the startup line and the stats
    up: PathProfile = field(default_factory=PathProfile)  # listening side -> target (edge -> cloud)
    down: PathProfile = field(default_factory=PathProfile)  # target -> listening side (cloud -> edge)
    seed: int = 0  # seeds the jitter; each connection and direction draws from its own generator
    packet_bytes: int = 1500  # an emulated packet arrives whole; serialization is charged per byte
    queue_bytes: int = 4 << 20  # bytes one direction may hold before it stops reading from the sender

    def __post_init__(self) -> None:
        if not 1 <= self.packet_bytes <= 1 << 20:
            raise UserError(f"packet size must be 1..{1 << 20} bytes, got {self.packet_bytes}")
        if self.queue_bytes < self.packet_bytes:
            raise UserError(f"queue of {self.queue_bytes} bytes is smaller than a packet ({self.packet_bytes})")

    @property
    def rtt_ms(self) -> float:
        return self.up.latency_ms + self.down.latency_ms

    def describe(self) -> str:
        if self.up == self.down:
            paths = f"RTT {self.rtt_ms:g} ms ({self.up.describe()} each way)"
        else:
            paths = f"RTT {self.rtt_ms:g} ms (up {self.up.describe()}; down {self.down.describe()})"
        return f"{self.name}: {paths}, seed {self.seed}"


def symmetric(name: str, rtt_ms: float, bandwidth_mbit: float, jitter_ms: float = 0.0) -> LinkProfile:
    """A link with the same path both ways: RTT/2 of propagation each way."""
    path = PathProfile(latency_ms=rtt_ms / 2, bandwidth_mbit=bandwidth_mbit, jitter_ms=jitter_ms)
    return LinkProfile(name=name, up=path, down=path)


PRESETS: dict[str, LinkProfile] = {
    "lan": symmetric("lan", rtt_ms=1.0, bandwidth_mbit=1000.0),
    "wifi": symmetric("wifi", rtt_ms=10.0, bandwidth_mbit=100.0),
    "wan": symmetric("wan", rtt_ms=50.0, bandwidth_mbit=20.0),
}

UpDown = tuple[float, float]  # (up, down) values of one path field


def parse_up_down(text: str, what: str) -> UpDown:
    """'25' -> (25, 25); '10:40' -> (10, 40) as (up, down); a UserError for anything else."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise UserError(f"{what} takes a number, or UP:DOWN like 10:40; got {text!r}")
    if any(math.isnan(v) or math.isinf(v) or v < 0 for v in values):
        raise UserError(f"{what} must be finite and >= 0, got {text!r}")
    return (values[0], values[-1])


def resolve_profile(preset: str | None = None, *, latency_ms: UpDown | None = None,
                    bandwidth_mbit: UpDown | None = None, jitter_ms: UpDown | None = None,
                    seed: int | None = None, packet_bytes: int | None = None,
                    queue_bytes: int | None = None) -> LinkProfile:
    """A preset (or the perfect default link) with the given fields replaced."""
    if preset is None:
        base = LinkProfile()
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    paths = {}
    for side, index in (("up", 0), ("down", 1)):
        changes = {name: value[index] for name, value in
                   (("latency_ms", latency_ms), ("bandwidth_mbit", bandwidth_mbit), ("jitter_ms", jitter_ms))
                   if value is not None}
        paths[side] = replace(getattr(base, side), **changes)
    others = {name: value for name, value in
              (("seed", seed), ("packet_bytes", packet_bytes), ("queue_bytes", queue_bytes)) if value is not None}
    changed = paths["up"] != base.up or paths["down"] != base.down
    name = base.name if preset is None or not changed else f"{preset}+custom"
    return replace(base, name=name, **paths, **others)


@dataclass(frozen=True)
class Endpoint:
    """A TCP address; port 0 on a listening endpoint asks the system for a free port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, *, listening: bool = False) -> Endpoint:
    """'HOST:PORT', 'tcp://HOST:PORT', '[::1]:PORT', ':PORT' or 'PORT' (host 127.0.0.1); '*' binds all."""
    raw = text.strip()
    body = raw[len("tcp://"):] if raw.startswith("tcp://") else raw
    if "://" in body:
        raise UserError(f"only tcp:// addresses can be forwarded, got {text!r}")
    if body.startswith("["):
        host, sep, port_text = body[1:].partition("]:")
        if not sep:
            raise UserError(f"bad address {text!r}: expected [IPV6]:PORT")
        _check_ipv6(host, text)
    elif ":" in body:
        host, _, port_text = body.rpartition(":")
    else:
        host, port_text = "", body
    host = host or "127.0.0.1"
    if host == "*":
        if not listening:
            raise UserError(f"bad address {text!r}: '*' can only be listened on")
        host = "0.0.0.0"
    if ":" in host and not body.startswith("["):
        raise UserError(f"bad address {text!r}: write IPv6 hosts in brackets, like [::1]:5555")
    lowest = 0 if listening else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise UserError(f"bad address {text!r}: the port must be a number in {lowest}..65535")
    if any(c.isspace() for c in host):
        raise UserError(f"bad address {text!r}: the host has spaces")
    return Endpoint(host, int(port_text))


def _check_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise UserError(f"bad address {text!r}: {host!r} is not an IPv6 address") from None


@dataclass(frozen=True)
class Forward:
    """Connections accepted on `listen` are relayed through the link to `target`."""

    listen: Endpoint
    target: Endpoint

    def __str__(self) -> str:
        return f"{self.listen} -> {self.target}"


def parse_forward(text: str) -> Forward:
    """'LISTEN=TARGET', e.g. '127.0.0.1:6555=127.0.0.1:5555'."""
    listen, sep, target = text.partition("=")
    if not sep or not listen or not target:
        raise UserError(f"--forward takes LISTEN=TARGET, like 127.0.0.1:6555=127.0.0.1:5555; got {text!r}")
    return Forward(parse_endpoint(listen, listening=True), parse_endpoint(target))
