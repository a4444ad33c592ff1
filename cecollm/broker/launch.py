"""Start `cecollm-broker` as a subprocess on 127.0.0.1 and wait for its READY (tests, benchmarks, tools)."""

from __future__ import annotations

import sys
from pathlib import Path

from cecollm.runtime import DaemonProcess, free_ports


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
        super().__init__(args, 1, log_path, start_timeout)
