"""Start `cecollm-broker` as a subprocess on 127.0.0.1 and wait for its READY (tests, benchmarks, tools)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import psutil

from cecollm.runtime import DaemonProcess, free_ports
from cecollm.wire.security import launcher_keys


class BrokerProcess(DaemonProcess):
    """`cecollm-broker` on 127.0.0.1 with free ports."""

    what = "broker"

    def __init__(self, model: str, workers: int = 1, extra: list[str] | None = None, log_path: str | Path | None = None,
                 start_timeout: float = 180.0, ipc_base: str | None = None, secure: bool = True,
                 keys_dir: str | Path | None = None, ports: tuple[int, int, int] | None = None) -> None:
        """`ipc_base` (ipc://DIR/NAME): also bind NAME.requests and NAME.uploads for same-host edges.
        `secure`: with keys made in `keys_dir` (default: a temporary directory) with a device bundle for any
        device id (`device_keys`) and one for a worker host (`worker_keys`); else --insecure. `ports`: the
        request, upload and worker ports (default: free ones), e.g. an earlier broker's (`self.ports`)."""
        self.ports = req, upl, wrk = ports or free_ports(3)
        self.request_address = f"tcp://127.0.0.1:{req}"
        self.upload_address = f"tcp://127.0.0.1:{upl}"
        self.worker_address = f"tcp://127.0.0.1:{wrk}"
        also_req = f",{ipc_base}.requests" if ipc_base else ""
        also_upl = f",{ipc_base}.uploads" if ipc_base else ""
        if ipc_base:
            extra = ["--state-address", f"{ipc_base}.state", *(extra or [])]
        self.keys_dir = self.device_keys = self.worker_keys = None
        if secure:
            self.keys_dir = Path(keys_dir or tempfile.mkdtemp(prefix="cecollm-keys-"))
            self.device_keys, self.worker_keys = map(str, launcher_keys(self.keys_dir))
            extra = ["--keys", str(self.keys_dir), *(extra or [])]
        else:
            extra = ["--insecure", *(extra or [])]
        args = [sys.executable, "-m", "cecollm.broker", "--model", str(model), "--workers", str(workers),
                "--requests", self.request_address + also_req, "--uploads", self.upload_address + also_upl,
                "--workers-address", self.worker_address, *(extra or [])]
        super().__init__(args, 1, log_path, start_timeout)

    def content_manager_pid(self) -> int:
        """The broker's child that listens on the upload port (0 if none does)."""
        port = int(self.upload_address.rpartition(":")[2])
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return 0
