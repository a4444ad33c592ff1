"""Fanout: many edge devices against one broker, each with its own device id.

Two modes. `live`: N real EdgeClients (threads sharing one model) generate; on a small machine
they fight the cloud for the CPU, so what is measured is the machine, not the cloud. `replay`:
a trace recorded from one real edge run (`record_trace`, live.py; the trace format: trace.py) is replayed by N
devices that send the same HELLO, uploads, DECIDE requests and END at the recorded pace, the
edge's compute replaced by sleeping its recorded time: the cloud does its real work for N
devices, the edge side costs nothing. The cloud is exact and deterministic, so every reply must
equal the token in the trace; a different one is counted as an error.

`run_fanout(FanoutConfig(...)) -> FanoutReport` (config.py, report.py): per-request (DECIDE) latency p50/p99, cloud
tokens/s, errors, timeouts, and the content manager's memory (memory.py).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable

from cecollm.errors import UserError
from cecollm.loadgen.config import FanoutConfig, check_config
from cecollm.loadgen.live import live_devices, order
from cecollm.loadgen.memory import MemoryMonitor, find_content_manager
from cecollm.loadgen.report import ClientSummary, FanoutReport, build_report

log = logging.getLogger(__name__)


def run_fanout(config: FanoutConfig, progress: Callable[[int], None] | None = None) -> FanoutReport:
    """Run `clients` devices at once against the broker; `progress(n)` after each generation."""
    check_config(config)
    rng = random.Random(config.seed)
    delays = [rng.uniform(0, config.stagger) if config.stagger else 0.0 for _ in range(config.clients)]
    summaries = [ClientSummary(config.device_base + i) for i in range(config.clients)]
    stop = threading.Event()
    user_errors: list[UserError] = []  # a device refused for the user's mistake (model/split mismatch)
    if config.mode == "replay":
        from cecollm.loadgen.replay import ReplayDevice
        from cecollm.loadgen.trace import Trace

        if not config.trace:
            raise UserError("replay needs a trace (--trace FILE; record one with --record)")
        trace = Trace.load(config.trace)
        rounds = itertools.cycle if config.duration else list  # with a duration: round and round until `stop`
        threads = [threading.Thread(target=ReplayDevice(config, trace, summaries[i], stop, user_errors).run,
                                    args=(rounds(order(len(trace.generations), i, config.rotate)), delays[i], progress),
                                    name=f"fanout-{i}", daemon=True) for i in range(config.clients)]
        if config.duration:  # ends the devices' rounds; it ends itself when something else stops them first
            threading.Thread(target=lambda: stop.wait(config.duration) or stop.set(), daemon=True).start()
    else:
        threads = live_devices(config, summaries, delays, stop, progress, user_errors)
    monitor, note = _monitor(config)
    t0 = time.perf_counter()
    try:
        if monitor:
            monitor.__enter__()
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join(config.timeout + 5)
        raise
    finally:
        if monitor:
            monitor.__exit__(None, None, None)
    wall = time.perf_counter() - t0
    if user_errors:
        raise user_errors[0]
    return build_report(config, summaries, wall, monitor, note)


def _monitor(config: FanoutConfig):
    import psutil

    if config.cm_pid:
        try:
            return MemoryMonitor(psutil.Process(config.cm_pid), config.memory_interval), ""
        except psutil.NoSuchProcess:
            return None, f"no process {config.cm_pid}"
    proc = find_content_manager(config.edge.upload_address, config.broker_pid or None)
    if proc is None:
        where = f"broker {config.broker_pid}'s tree" if config.broker_pid else "this user's processes"
        return None, f"no process in {where} is bound to {config.edge.upload_address} (give --cm-pid)"
    return MemoryMonitor(proc, config.memory_interval), ""


