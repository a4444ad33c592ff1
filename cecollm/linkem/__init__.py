"""A user-space TCP link emulator: one-way latency, bandwidth and jitter, each direction on its own.

    from cecollm.linkem import LinkEmulator, PRESETS, parse_forward
    with LinkEmulator([parse_forward("127.0.0.1:6555=127.0.0.1:5555")], PRESETS["wifi"]) as link:
        ...  # connect to 127.0.0.1:6555 instead of 5555
        print(link.stats().up.bytes_out)
"""

from cecollm.linkem.delayline import DelayLine, DirectionStats
from cecollm.linkem.emulator import ForwardStats, LinkEmulator, LinkStats
from cecollm.linkem.probe import LinkMeasurement, ProbeServer, measure_link, measure_overhead
from cecollm.linkem.profile import (
                                    PRESETS,
                                    Endpoint,
                                    Forward,
                                    LinkProfile,
                                    PathProfile,
                                    parse_endpoint,
                                    parse_forward,
                                    resolve_profile,
                                    symmetric,
)

__all__ = ["DelayLine", "DirectionStats", "Endpoint", "Forward", "ForwardStats", "LinkEmulator",
           "LinkMeasurement", "LinkProfile", "LinkStats", "PRESETS", "PathProfile", "ProbeServer",
           "measure_link", "measure_overhead", "parse_endpoint", "parse_forward", "resolve_profile",
           "symmetric"]
