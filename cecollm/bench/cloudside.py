"""The cloud side of a benchmark: the broker and the baseline cloud as processes, behind the link emulator.

Two devices on one machine: the edge (this process, the link emulator's thread included) runs on
one core, every cloud process (broker, content manager, workers, baseline cloud) on another, each
with one torch thread. With a single core both share it, and the run says so.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil

from cecollm.broker.launch import BrokerProcess
from cecollm.errors import CecollmError, UserError
from cecollm.runtime import DaemonProcess, free_ports
from cecollm.wire.security import ClientKeys, launcher_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorePlan:
    """Which cores the edge and the cloud get; `note` says what was done."""

    edge: tuple[int, ...]
    cloud: tuple[int, ...]
    note: str


def plan_cores(pin: bool) -> CorePlan:
    cores = sorted(os.sched_getaffinity(0))
    if not pin:
        return CorePlan(tuple(cores), tuple(cores), f"not pinned (--no-pin): edge and cloud share cores {cores}")
    if len(cores) < 2:
        return CorePlan(tuple(cores), tuple(cores), f"only core {cores} available: edge and cloud share it")
    return CorePlan((cores[0],), (cores[1],), f"edge on core {cores[0]}, cloud processes on core {cores[1]}")


def pin_this_process(cores: tuple[int, ...]) -> None:
    """Every thread of this process (and threads and children started later) on `cores`."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass


def pin_tree(pid: int, cores: tuple[int, ...]) -> int:
    """Pin a process and all its descendants; the number of processes pinned."""
    root = psutil.Process(pid)
    count = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.cpu_affinity(list(cores))
            count += 1
        except psutil.NoSuchProcess:
            pass
    return count


class BaselineProcess(DaemonProcess):
    """`python -m cecollm.bench.baselines.server` on a free port; `with` stops it (SIGTERM) and waits."""

    what = "baseline cloud"

    def __init__(self, model: str, exits: str = "", heads: str = "", threads: int = 1,
                 log_path: str | Path | None = None, start_timeout: float = 180.0, keys_dir: str | Path = "") -> None:
        (port,) = free_ports(1)
        self.address = f"tcp://127.0.0.1:{port}"
        args = [sys.executable, "-m", "cecollm.bench.baselines.server", "--address", self.address, "--model", str(model),
                "--threads", str(threads)]
        if exits:
            args += ["--exits", exits]
        if heads:
            args += ["--heads", heads]
        if keys_dir:
            args += ["--keys", str(keys_dir)]
        super().__init__(args, threads, log_path, start_timeout)


@dataclass(frozen=True)
class EdgeAddresses:
    """Where the edge connects: every address goes through the link emulator."""

    broker: str  # the broker's request address ("" when no broker runs)
    upload: str  # the content manager's upload address
    baseline: str  # the baseline cloud ("" when it does not run)


class CloudSide:
    """Starts what the strategies need, pins cores, and puts the link emulator in front of every socket."""

    def __init__(self, model: str, exits: str, heads: str, threads: int, link_profile, plan: CorePlan,
                 log_dir: Path, broker: bool, baseline: bool, broker_extra: list[str] | None = None) -> None:
        self._stack = ExitStack()
        self.model, self.exits, self.heads, self.threads = model, exits, heads, threads
        self.profile = link_profile
        self.plan = plan
        self.log_dir = log_dir
        self.want_broker, self.want_baseline = broker, baseline
        self.broker_extra = broker_extra or []
        self.broker: BrokerProcess | None = None
        self.baseline: BaselineProcess | None = None
        self.link = None
        self.addresses: EdgeAddresses | None = None

    def __enter__(self) -> CloudSide:
        try:
            self._start()
        except CecollmError as exc:  # a cloud process that does not start: say where its log is, no traceback
            self._stack.close()
            raise UserError(f"{exc} (logs in {self.log_dir})") from None
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _start(self) -> None:
        from cecollm.linkem import LinkEmulator, parse_forward

        pin_this_process(self.plan.edge)  # cloud processes start here, then move to their core
        self.log_dir.mkdir(parents=True, exist_ok=True)
        split_args = (["--exits", self.exits] if self.exits else []) + (["--heads", self.heads] if self.heads else [])
        targets = []
        keys_dir = self.log_dir / "keys"  # every cloud socket speaks CURVE, the baselines' too
        device, _ = launcher_keys(keys_dir)
        self.device_keys, self.device_bundle = ClientKeys.load(device), str(device)
        if self.want_broker:
            self.broker = self._stack.enter_context(BrokerProcess(
                self.model, workers=1, log_path=self.log_dir / "broker.log", keys_dir=keys_dir,
                extra=["--threads", str(self.threads), *split_args, *self.broker_extra]))
            pinned = pin_tree(self.broker.proc.pid, self.plan.cloud)
            log.info("broker up (%d processes on cores %s)", pinned, list(self.plan.cloud))
            targets += [self.broker.request_address, self.broker.upload_address]
        if self.want_baseline:
            self.baseline = self._stack.enter_context(BaselineProcess(
                self.model, self.exits, self.heads, self.threads, log_path=self.log_dir / "baseline-cloud.log",
                keys_dir=keys_dir))
            pin_tree(self.baseline.proc.pid, self.plan.cloud)
            targets.append(self.baseline.address)
        if not targets:
            self.addresses = EdgeAddresses("", "", "")
            return
        forwards = [parse_forward(f"127.0.0.1:0={t.removeprefix('tcp://')}") for t in targets]
        self.link = self._stack.enter_context(LinkEmulator(forwards, self.profile))
        via = [f"tcp://{ep}" for ep in self.link.listening]
        if self.want_broker:
            broker, upload, rest = via[0], via[1], via[2:]
        else:
            broker, upload, rest = "", "", via
        self.addresses = EdgeAddresses(broker, upload, rest[0] if rest else "")

    def content_manager_pid(self) -> int:
        """The broker's child that listens on the real upload port (0 if not found)."""
        return self.broker.content_manager_pid() if self.broker is not None else 0

    def wire_bytes(self) -> tuple[int, int, float]:
        """(up bytes, down bytes, seconds on the wire) the link delivered since the last reset, after letting
        in-flight bytes land. The seconds are measured by the link as it delivers: wall time during which
        any direction carried bytes (a union: an upload and a reply in flight together count once)."""
        if self.link is None:
            return 0, 0, 0.0
        last = None
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # the sender thread and the emulator may still carry the tail
            s = self.link.stats()
            now = (s.up.bytes_in, s.up.bytes_out, s.down.bytes_in, s.down.bytes_out)
            if now == last and now[0] == now[1] and now[2] == now[3]:
                break
            last = now
            time.sleep(0.02)
        s = self.link.stats()
        return s.up.bytes_out, s.down.bytes_out, s.busy_s

    def reset_link(self) -> None:
        if self.link is not None:
            self.link.reset_stats()
