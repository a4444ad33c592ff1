"""The content manager's memory during a fanout run, read with psutil.

The content manager is the process that binds the broker's upload socket, so it is found as
the process (in a given broker's tree, or any of this user's) listening on the upload port,
or given by pid. Its RSS and PSS (smaps_rollup: shared pages split among the processes that
map them) are sampled in a background thread; next to them the bytes the broker's device
segments really occupy in /dev/shm (allocated blocks of `cecollm-<broker pid>-*`), since rows
and KV that workers write are not in the manager's own RSS until it touches them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from cecollm.cache import shm


@dataclass
class MemorySample:
    rss: int  # bytes
    pss: int  # bytes
    shm: int  # bytes allocated by the broker's device segments


def _listens_on(proc: psutil.Process, address: str) -> bool:
    try:
        if address.startswith("tcp://"):
            port = int(address.rpartition(":")[2])
            return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                       for c in proc.net_connections(kind="tcp"))
        if address.startswith("ipc://"):
            path = address[len("ipc://"):]
            return any(c.laddr == path for c in proc.net_connections(kind="unix"))
    except (psutil.Error, ValueError):
        return False
    return False


def find_content_manager(upload_address: str, broker_pid: int | None = None) -> psutil.Process | None:
    """The process bound to `upload_address` (the content manager), or None."""
    if broker_pid:
        try:
            root = psutil.Process(broker_pid)
            candidates = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
    else:
        me = psutil.Process().username()
        candidates = []
        for p in psutil.process_iter(["username", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["username"] == me and ("multiprocessing" in cmd or "cecollm" in cmd):
                candidates.append(p)
    for proc in candidates:
        if _listens_on(proc, upload_address):
            return proc
    return None


def segment_bytes(broker_pid: int) -> int:
    """Bytes the broker's device segments occupy in /dev/shm (allocated, not their nominal size)."""
    total = 0
    for path in Path(shm.SHM_DIR).glob(shm.segment_prefix(broker_pid) + "*"):
        try:
            total += path.stat().st_blocks * 512
        except FileNotFoundError:
            pass  # released while we looked
    return total


class MemoryMonitor:
    """Samples a process every `interval` seconds until stopped; keeps the first, last and peaks."""

    def __init__(self, proc: psutil.Process, interval: float = 0.1) -> None:
        self.proc = proc
        self.broker_pid = proc.ppid()
        self.interval = interval
        self.samples: list[MemorySample] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cm-memory", daemon=True)

    def sample(self) -> MemorySample | None:
        try:
            info = self.proc.memory_full_info()
        except psutil.Error as exc:
            self.error = f"content manager {self.proc.pid}: {exc.__class__.__name__}"
            return None
        s = MemorySample(info.rss, getattr(info, "pss", 0), segment_bytes(self.broker_pid))
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.sample() is None:
                return

    def __enter__(self) -> MemoryMonitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def peak(self, name: str) -> int:
        return max((getattr(s, name) for s in self.samples), default=0)
