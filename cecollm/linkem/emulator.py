"""LinkEmulator: TCP forwards through an emulated link, served by an asyncio loop in a background thread.

The loop uses select() rather than epoll: epoll rounds timeouts up to whole milliseconds, which
would add up to 1 ms to every delay; select() wakes within tens of microseconds. select() handles
at most 1024 descriptors, far more than an edge and a few devices open.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import random
import selectors
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from cecollm.errors import UserError
from cecollm.linkem.delayline import DelayLine, DirectionCounters, DirectionStats, LinkOccupancy
from cecollm.linkem.profile import Endpoint, Forward, LinkProfile

log = logging.getLogger(__name__)

PR_SET_TIMERSLACK = 29  # prctl option (Linux)
CONNECT_TIMEOUT_S = 5.0  # how long a new connection waits for the target to accept
START_TIMEOUT_S = 10.0  # how long start() waits for the listening sockets


@dataclass(frozen=True)
class ForwardStats:
    """One forward's traffic, summed over its connections."""

    forward: str  # "LISTEN -> TARGET", with the port actually bound
    accepted: int  # connections accepted on the listening side
    active: int  # connections open now
    refused: int  # connections dropped because the target did not accept
    up: DirectionStats  # listening side -> target
    down: DirectionStats  # target -> listening side


@dataclass(frozen=True)
class LinkStats:
    """Everything the emulator carried since it started."""

    profile: str
    forwards: tuple[ForwardStats, ...]
    busy_s: float = 0.0  # wall time any direction of any connection carried bytes (union; measured at delivery)

    @property
    def up(self) -> DirectionStats:
        return sum((f.up for f in self.forwards), DirectionStats())

    @property
    def down(self) -> DirectionStats:
        return sum((f.down for f in self.forwards), DirectionStats())

    def to_dict(self) -> dict:
        return {"profile": self.profile, "busy_s": self.busy_s, "up": self.up.to_dict(), "down": self.down.to_dict(),
                "forwards": [{"forward": f.forward, "accepted": f.accepted, "active": f.active,
                              "refused": f.refused, "up": f.up.to_dict(), "down": f.down.to_dict()}
                             for f in self.forwards]}


@dataclass
class _ForwardState:
    """One forward inside the loop: its server, its connection count, its counters."""

    index: int
    forward: Forward
    listening: Endpoint | None = None
    server: asyncio.base_events.Server | None = None
    connections: int = 0  # connections ever accepted: numbers them (and seeds their jitter)
    accepted: int = 0
    active: int = 0
    refused: int = 0
    up: DirectionCounters = field(default_factory=DirectionCounters)
    down: DirectionCounters = field(default_factory=DirectionCounters)


class LinkEmulator:
    """Relays every connection accepted on a forward's listening address to its target through the link.

    Use as `with LinkEmulator(forwards, profile) as link: ...` or start()/stop(). `listening` gives the
    bound addresses (a listening port 0 gets a free port); `stats()` the bytes and delays so far.
    """

    def __init__(self, forwards: Iterable[Forward], profile: LinkProfile = LinkProfile()) -> None:
        self.profile = profile
        self._forwards = [_ForwardState(i, f) for i, f in enumerate(forwards)]
        if not self._forwards:
            raise UserError("nothing to forward: give at least one LISTEN=TARGET pair")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._relays: set[asyncio.Task] = set()
        self._occupancy = LinkOccupancy()

    # -- the caller's thread ------------------------------------------------------------------

    def start(self) -> LinkEmulator:
        """Bind every listening address and start relaying; raises UserError when one cannot be bound."""
        assert self._thread is None, "a LinkEmulator starts once"
        self._loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=self._run, name="linkem", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            self.stop()
            raise UserError(f"the link emulator did not start within {START_TIMEOUT_S:g} s")
        if self._start_error is not None:
            self._thread.join(START_TIMEOUT_S)
            raise self._start_error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening sockets and every relayed connection; wait for the loop to end."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the link emulator's loop did not stop"

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def listening(self) -> tuple[Endpoint, ...]:
        """The bound listening addresses, in the order of the forwards."""
        return tuple(state.listening for state in self._forwards)

    @property
    def forwards(self) -> tuple[Forward, ...]:
        """The forwards as bound (listening ports resolved)."""
        return tuple(Forward(state.listening or state.forward.listen, state.forward.target)
                     for state in self._forwards)

    def stats(self) -> LinkStats:
        return LinkStats(self.profile.name, tuple(
            ForwardStats(str(fw), s.accepted, s.active, s.refused, s.up.snapshot(), s.down.snapshot())
            for fw, s in zip(self.forwards, self._forwards)), self._occupancy.busy_s())

    def reset_stats(self) -> None:
        """Start the byte and delay counts (and accepted/refused) from zero, e.g. between benchmark runs."""
        if self._thread is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._reset(), self._loop).result(START_TIMEOUT_S)
        else:
            self._reset_now()

    async def _reset(self) -> None:
        self._reset_now()

    def _reset_now(self) -> None:
        for state in self._forwards:
            state.up.reset()
            state.down.reset()
            state.accepted = state.refused = 0
        self._occupancy.reset(self._loop.time() if self._loop is not None else 0.0)

    def describe(self) -> str:
        """One line: the forwards and the profile."""
        return f"linkem {', '.join(map(str, self.forwards))} | {self.profile.describe()}"

    # -- the loop's thread --------------------------------------------------------------------

    def _rng(self, state: _ForwardState, number: int, side: str) -> random.Random:
        """Jitter draws of one direction of one connection: the same seed gives the same draws."""
        return random.Random(f"{self.profile.seed}/{state.index}/{number}/{side}")

    def _run(self) -> None:
        _reduce_timer_slack()
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # reported to start() in the caller's thread
            self._start_error = exc
            loop.run_until_complete(self._close())
            loop.close()
            self._started.set()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._close())
            loop.close()

    async def _open(self) -> None:
        for state in self._forwards:
            ep = state.forward.listen
            try:
                state.server = await asyncio.start_server(
                    lambda r, w, s=state: self._accept(s, r, w), ep.host, ep.port, reuse_address=True)
            except OSError as exc:
                raise UserError(f"cannot listen on {ep}: {exc.strerror or exc}") from None
            host, port = state.server.sockets[0].getsockname()[:2]
            state.listening = Endpoint(host, port)

    async def _close(self) -> None:
        for state in self._forwards:
            if state.server is not None:
                state.server.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        for state in self._forwards:
            if state.server is not None:
                await state.server.wait_closed()

    def _accept(self, state: _ForwardState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.accepted += 1
        task = asyncio.get_running_loop().create_task(self._relay(state, state.connections, reader, writer))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay(self, state: _ForwardState, number: int, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        target = state.forward.target
        try:
            target_reader, target_writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            state.refused += 1
            log.warning("linkem: %s did not accept a connection (%s); closing the client's",
                        target, getattr(exc, "strerror", None) or type(exc).__name__)
            client_writer.transport.abort()
            return
        except asyncio.CancelledError:  # stopped while connecting
            client_writer.transport.abort()
            raise
        state.active += 1
        loop = asyncio.get_running_loop()
        p = self.profile
        lines = [DelayLine(path, p.packet_bytes, p.queue_bytes, self._rng(state, number, side), counters, loop.time,
                           self._occupancy)
                 for side, path, counters in (("up", p.up, state.up), ("down", p.down, state.down))]
        pumps = [lines[0].feed(client_reader), lines[0].deliver(target_writer),
                 lines[1].feed(target_reader), lines[1].deliver(client_writer)]
        tasks = [loop.create_task(pump) for pump in pumps]
        writers = (client_writer, target_writer)
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if t.exception() is not None]
            if failed:  # a reset or a broken pipe: the connection is over on both sides
                log.debug("linkem: connection %d on %s ended: %r", number, state.listening, failed[0].exception())
                _abort(writers, tasks)
                await asyncio.gather(*tasks, return_exceptions=True)
            else:
                for w in writers:
                    w.close()
        except asyncio.CancelledError:  # the emulator is stopping
            _abort(writers, tasks)
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            state.active -= 1
            for line in lines:
                line.close()


def _abort(writers, tasks) -> None:
    for task in tasks:
        task.cancel()
    for w in writers:
        w.transport.abort()


def _reduce_timer_slack() -> None:
    """Ask Linux to wake this thread's timers on time (its default slack is 50 us); elsewhere a no-op."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
