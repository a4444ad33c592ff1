"""Start a broker daemon as a subprocess and wait until it serves (tests, benchmarks, tools)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cecollm.errors import CecollmError


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 nobody listens on right now."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent():
    """A preexec function that makes the child get SIGTERM when this process dies (Linux), so a test
    or benchmark killed mid-run leaves no broker behind; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, only called after
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return set_pdeathsig


class DaemonProcess:
    """A cecollm server run as a subprocess on 127.0.0.1: waits for its startup line, gets SIGTERM when
    this process dies, and `with` (or stop()) ends it with SIGTERM and waits."""

    what = "server"  # named in the error when it does not start

    def __init__(self, args: list[str], startup_prefix: str, threads: int = 1,
                 log_path: str | Path | None = None, start_timeout: float = 180.0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                     preexec_fn=_die_with_parent())
        self.startup_line = self._wait_line(startup_prefix, start_timeout)

    def _wait_line(self, prefix: str, timeout: float) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = self.proc.stdout.readline()
                if line.startswith(prefix):
                    # whatever else comes on stdout is read and dropped: a full pipe would stop the server
                    threading.Thread(target=self.proc.stdout.read, name="daemon-stdout", daemon=True).start()
                    return line.strip()
                if not line and self.proc.poll() is not None:
                    break
            elif self.proc.poll() is not None:
                break
        self.stop()
        where = f"; see {self.log_path}" if self.log_path else ""
        raise CecollmError(f"the {self.what} did not start (exit code {self.proc.returncode}){where}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
            self._log = subprocess.DEVNULL
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class BrokerProcess(DaemonProcess):
    """`cecollm-broker` on 127.0.0.1 with free ports."""

    what = "broker"

    def __init__(self, model: str, workers: int = 1, extra: list[str] | None = None, log_path: str | Path | None = None,
                 start_timeout: float = 180.0, ipc_base: str | None = None) -> None:
        """`ipc_base` (ipc://DIR/NAME): also bind NAME.requests and NAME.uploads for same-host edges."""
        req, upl, wrk = free_ports(3)
        self.request_address = f"tcp://127.0.0.1:{req}"
        self.upload_address = f"tcp://127.0.0.1:{upl}"
        self.worker_address = f"tcp://127.0.0.1:{wrk}"
        also_req = f",{ipc_base}.requests" if ipc_base else ""
        also_upl = f",{ipc_base}.uploads" if ipc_base else ""
        if ipc_base:
            extra = ["--state-address", f"{ipc_base}.state", *(extra or [])]
        args = [sys.executable, "-m", "cecollm.broker", "--model", str(model), "--workers", str(workers),
                "--requests", self.request_address + also_req, "--uploads", self.upload_address + also_upl,
                "--workers-address", self.worker_address, *(extra or [])]
        super().__init__(args, "cecollm-broker:", 1, log_path, start_timeout)
