"""`cecollm linkem`: run the link emulator between the edge and the broker until SIGINT/SIGTERM."""

from __future__ import annotations

import math
import signal
import threading
import time

import click
import orjson

from cecollm.cliutil import GuardedCommand
from cecollm.errors import UserError
from cecollm.linkem.profile import PRESETS, LinkProfile, parse_forward, parse_up_down, resolve_profile

_DEFAULTS = LinkProfile()


class _OneLineUsageError(click.UsageError):
    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class LinkemCommand(GuardedCommand):
    """A GuardedCommand whose option errors (a value of the wrong type, an unknown option) are one line too."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from None


def _presets_help() -> str:
    return "; ".join(f"{name}: {p.rtt_ms:g} ms RTT, {p.up.bandwidth_mbit:g} Mbit/s" for name, p in PRESETS.items())


@click.command(cls=LinkemCommand)
@click.option("--listen", default=None, metavar="HOST:PORT", help="Accept connections here (with --target).")
@click.option("--target", default=None, metavar="HOST:PORT", help="... and relay them to here.")
@click.option("--forward", "forwards", multiple=True, metavar="LISTEN=TARGET",
              help="A listen/target pair; repeat it for every socket the edge opens (upload, requests).")
@click.option("--preset", default=None, help=f"A named link: {_presets_help()} [default: a perfect link].")
@click.option("--latency-ms", default=None, metavar="MS|UP:DOWN",
              help=f"One-way propagation delay each way, or UP:DOWN (edge->cloud:cloud->edge) "
                   f"[default: the preset's, else {_DEFAULTS.up.latency_ms:g}].")
@click.option("--bandwidth-mbit", default=None, metavar="MBIT|UP:DOWN",
              help=f"Link rate in Mbit/s, 0 = unlimited [default: the preset's, else {_DEFAULTS.up.bandwidth_mbit:g}].")
@click.option("--jitter-ms", default=None, metavar="MS|UP:DOWN",
              help=f"Random extra delay per packet, uniform in [0, MS]; it never reorders bytes "
                   f"[default: the preset's, else {_DEFAULTS.up.jitter_ms:g}].")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Seed of the jitter.")
@click.option("--packet-bytes", type=click.IntRange(min=1), default=_DEFAULTS.packet_bytes, show_default=True,
              help="Bytes per emulated packet (a packet arrives whole).")
@click.option("--queue-bytes", type=click.IntRange(min=1), default=_DEFAULTS.queue_bytes, show_default=True,
              help="Bytes a direction holds before it stops reading from its sender.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds [default: run until SIGINT/SIGTERM].")
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the bytes and delays carried, as JSON, to this file when stopping.")
@click.option("--measure", is_flag=True,
              help="Instead of forwarding: measure the profile on loopback (RTT and rates, with and without "
                   "the emulator) and print it next to its settings.")
def linkem(listen, target, forwards, preset, latency_ms, bandwidth_mbit, jitter_ms, seed, packet_bytes,
           queue_bytes, duration, stats_path, measure):
    """Emulate a network link (latency, bandwidth, jitter; each direction on its own) between the edge
    and the broker: a TCP proxy, since kernel netem is not available.

    \b
    Example: the broker listens on 5555 (requests) and 5556 (uploads); point the edge at 6555/6556:
      cecollm linkem --preset wifi --forward :6555=:5555 --forward :6556=:5556
    """
    profile = resolve_profile(
        preset,
        latency_ms=parse_up_down(latency_ms, "--latency-ms") if latency_ms is not None else None,
        bandwidth_mbit=parse_up_down(bandwidth_mbit, "--bandwidth-mbit") if bandwidth_mbit is not None else None,
        jitter_ms=parse_up_down(jitter_ms, "--jitter-ms") if jitter_ms is not None else None,
        seed=seed, packet_bytes=packet_bytes, queue_bytes=queue_bytes)
    pairs = [parse_forward(text) for text in forwards]
    if (listen is None) != (target is None):
        raise UserError("--listen and --target go together")
    if listen is not None:
        pairs.insert(0, parse_forward(f"{listen}={target}"))
    if measure:
        from cecollm.linkem.probe import measure_link

        click.echo(measure_link(profile).describe())
        return
    if not pairs:
        raise UserError("nothing to forward: give --listen and --target, or --forward LISTEN=TARGET")
    _serve(pairs, profile, duration, stats_path)


def _serve(pairs, profile: LinkProfile, duration: float | None, stats_path: str | None) -> None:
    from cecollm.linkem.emulator import LinkEmulator

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        link = LinkEmulator(pairs, profile).start()
        try:
            click.echo(link.describe())
            deadline = math.inf if duration is None else time.monotonic() + duration
            while not stop.is_set() and time.monotonic() < deadline:
                stop.wait(min(0.25, deadline - time.monotonic()))
        finally:
            link.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = link.stats()
    if stats_path:
        with open(stats_path, "wb") as f:
            f.write(orjson.dumps(stats.to_dict(), option=orjson.OPT_INDENT_2))
    accepted = sum(f.accepted for f in stats.forwards)
    click.echo(f"linkem stopped: {accepted} connections, {stats.up.bytes_out} bytes up, "
               f"{stats.down.bytes_out} bytes down", err=True)
