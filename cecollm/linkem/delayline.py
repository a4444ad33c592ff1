"""One direction of one relayed connection: a byte queue that a link serializes and delays.

Each chunk read from the sender is cut into packets. A packet starts serializing when the link is
free (after the bytes before it), takes len*8/bandwidth to serialize, and arrives `latency` plus a
random jitter in [0, jitter] after its last bit left. An arrival is never earlier than the one
before it, so jitter delays bytes but never reorders them (TCP needs the stream intact).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields

from cecollm.linkem.profile import PathProfile

READ_BYTES = 64 * 1024  # the most one read from a sender takes


@dataclass(frozen=True)
class DirectionStats:
    """What one direction carried and the delays it applied (sums over packets unless said)."""

    bytes_in: int = 0  # bytes read from the sender
    bytes_out: int = 0  # bytes delivered to the receiver
    packets: int = 0  # emulated packets scheduled
    delay_s: float = 0.0  # scheduled delay: wait for the link + serialization + latency + jitter
    max_delay_s: float = 0.0  # the largest scheduled delay of one packet
    queueing_s: float = 0.0  # waiting for the link to finish the bytes ahead
    serialization_s: float = 0.0  # time the link spent serializing (its busy time; not a per-packet sum)
    jitter_s: float = 0.0  # delay beyond latency that jitter (and keeping order) added
    writes: int = 0  # deliveries to the receiver (due packets are written together)
    late_s: float = 0.0  # per write: how much later than scheduled it went out (emulator lag, slow receiver)
    max_late_s: float = 0.0  # the latest write
    transit_s: float = 0.0  # wall time with bytes inside the link (read, not yet delivered): time on the wire

    def __add__(self, other: DirectionStats) -> DirectionStats:
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = max(a, b) if f.name.startswith("max_") else a + b
        return DirectionStats(**merged)

    @property
    def mean_delay_ms(self) -> float:
        return 1e3 * self.delay_s / self.packets if self.packets else 0.0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class DirectionCounters:
    """The running sums behind DirectionStats; written by the emulator's loop, read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums = DirectionStats().to_dict()

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, value in amounts.items():
                if name.startswith("max_"):
                    self._sums[name] = max(self._sums[name], value)
                else:
                    self._sums[name] += value

    def reset(self) -> None:
        with self._lock:
            self._sums = DirectionStats().to_dict()

    def snapshot(self) -> DirectionStats:
        with self._lock:
            return DirectionStats(**self._sums)


class LinkOccupancy:
    """Wall time during which any direction of any connection carried bytes (the union, not a sum)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._carrying = 0  # directions with bytes inside the link now
        self._since = 0.0  # when that count last went from 0 to 1
        self._busy = 0.0  # finished busy spells since the last reset

    def enter(self, now: float) -> None:
        with self._lock:
            if self._carrying == 0:
                self._since = now
            self._carrying += 1

    def leave(self, now: float) -> None:
        with self._lock:
            assert self._carrying > 0, "a direction left the link without entering it"
            self._carrying -= 1
            if self._carrying == 0:
                self._busy += now - self._since

    def busy_s(self) -> float:
        """Finished busy spells (a spell still open counts from when the link emptied)."""
        with self._lock:
            return self._busy

    def reset(self, now: float) -> None:
        with self._lock:
            self._busy = 0.0
            self._since = now


_EOF = None  # the queue entry that carries the sender's end of stream


class DelayLine:
    """Bytes in from one socket, the same bytes out to another, each packet at its arrival time."""

    def __init__(self, path: PathProfile, packet_bytes: int, queue_bytes: int, rng: random.Random,
                 counters: DirectionCounters, clock: Callable[[], float],
                 occupancy: LinkOccupancy | None = None) -> None:
        self.path = path
        self._latency = path.latency_ms / 1e3
        self._jitter = path.jitter_ms / 1e3
        self._rate = path.bytes_per_second  # 0.0 = unlimited
        self._packet = packet_bytes
        self._limit = queue_bytes
        self._rng = rng
        self._counters = counters
        self._clock = clock
        self._occupancy = occupancy
        self._free_at = 0.0  # when the link has serialized everything scheduled so far
        self._last_arrival = 0.0  # arrivals never go back in time: no reordering
        self._queue: deque[tuple[float, memoryview | None]] = deque()  # (arrival, packet or _EOF)
        self._queued = 0  # bytes scheduled and not yet delivered
        self._busy_since: float | None = None  # when the link last went from empty to carrying bytes
        self._ready = asyncio.Event()  # the queue is not empty
        self._room = asyncio.Event()  # the queue is below its byte budget

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def schedule(self, data: bytes, now: float) -> list[float]:
        """Queue `data` read at `now`; returns each packet's arrival time."""
        view = memoryview(data)
        if self._queued == 0 and self._busy_since is None and len(view):
            self._busy_since = now
            if self._occupancy is not None:
                self._occupancy.enter(now)
        arrivals = []
        delay = queueing = jitter = worst = 0.0
        busy_before = self._free_at
        for offset in range(0, len(view), self._packet):
            packet = view[offset:offset + self._packet]
            start = max(now, self._free_at)
            self._free_at = start + (len(packet) / self._rate if self._rate else 0.0)
            sent = self._free_at + self._latency
            drawn = self._rng.uniform(0.0, self._jitter) if self._jitter else 0.0
            arrival = max(sent + drawn, self._last_arrival)
            self._last_arrival = arrival
            self._queue.append((arrival, packet))
            arrivals.append(arrival)
            delay += arrival - now
            worst = max(worst, arrival - now)
            queueing += start - now
            jitter += arrival - sent
        self._queued += len(view)
        busy = self._free_at - max(now, busy_before)
        self._counters.add(bytes_in=len(view), packets=len(arrivals), delay_s=delay, max_delay_s=worst,
                           queueing_s=queueing, serialization_s=busy, jitter_s=jitter)
        self._ready.set()
        return arrivals

    def close(self) -> None:
        """The connection is over: bytes still inside the link are dropped and stop counting as carried."""
        if self._busy_since is not None:
            now = self._clock()
            self._counters.add(transit_s=now - self._busy_since)
            self._busy_since = None
            if self._occupancy is not None:
                self._occupancy.leave(now)

    def schedule_eof(self, now: float) -> float:
        """The sender closed: the end of stream follows the last byte, one latency behind the link."""
        arrival = max(max(now, self._free_at) + self._latency, self._last_arrival)
        self._last_arrival = arrival
        self._queue.append((arrival, _EOF))
        self._ready.set()
        return arrival

    async def feed(self, reader: asyncio.StreamReader) -> None:
        """Read from the sender until it closes, pausing while the queue is over its budget."""
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                self.schedule_eof(self._clock())
                return
            self.schedule(data, self._clock())
            while self._queued >= self._limit:
                self._room.clear()
                await self._room.wait()

    async def deliver(self, writer: asyncio.StreamWriter) -> None:
        """Write each packet when it is due; pass the end of stream on as a half-close."""
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            wait = self._queue[0][0] - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            now = self._clock()
            late = now - self._queue[0][0]
            batch: list[memoryview] = []
            ended = False
            while self._queue and self._queue[0][0] <= now:
                _, packet = self._queue.popleft()
                if packet is _EOF:
                    ended = True
                    break
                batch.append(packet)
            size = sum(len(p) for p in batch)
            self._counters.add(bytes_out=size, writes=1, late_s=late, max_late_s=late)  # before the receiver sees them
            if batch:
                writer.write(b"".join(batch))
            self._queued -= size
            if self._queued == 0 and self._busy_since is not None:  # the last byte in the link has arrived
                self._counters.add(transit_s=now - self._busy_since)
                self._busy_since = None
                if self._occupancy is not None:
                    self._occupancy.leave(now)
            self._room.set()
            if ended:
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                return
            await writer.drain()
