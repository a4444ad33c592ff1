"""One process runtime for every daemon, and the launcher that starts one and waits for it.

A daemon (broker, content manager, worker, baseline cloud) starts through `run_daemon(role,
main, config)`: one logging setup, one signal handling (SIGTERM and SIGINT stop it, SIGHUP
runs its reload hooks), the parent-death signal when something launched it, and a READY
message (wire/launch.py) to whoever launched it once it serves, or FAILED with the one-line
reason it could not. `main(config, runtime)` serves until `runtime.stopping` is set; then the process ends with its
exit code at once (exit_now).

`DaemonProcess` is the launcher's side (tests, benchmarks, the broker for its children): it
binds a PULL socket, starts the daemon with that address, and waits for READY (its `info`
holds the daemon's addresses) or FAILED, or the daemon's exit, within a deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from cecollm.cliutil import setup_logging
from cecollm.errors import CecollmError, UserError
from cecollm.wire import launch
from cecollm.wire.wire import ProtocolError, clip

READY_ENV = "CECOLLM_READY"  # the launcher's READY address, for a daemon started as a command

log = logging.getLogger(__name__)


def die_with_parent() -> None:
    """This process gets SIGTERM when the process that started it dies (Linux), so a test or benchmark
    killed mid-run, or a SIGKILLed broker, leaves nothing behind."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Runtime:
    """What a daemon's main function gets from the runtime: the stop flag, READY, reload hooks."""

    def __init__(self, role: str, ready_address: str | None) -> None:
        self.role = role
        self.ready_address = ready_address
        self.stopping = threading.Event()  # set by SIGTERM/SIGINT: serving loops end
        self._on_stop: list[Callable[[], None]] = []
        self._on_reload: list[Callable[[], None]] = []
        self._reload_asked = False  # SIGHUP came: the serving loop runs the reload hooks (run_reloads)
        self._told = False
        self.serving = False  # READY said: from now on a stop is a flag the serving loop reads

    @property
    def running(self) -> bool:
        return not self.stopping.is_set()

    def on_stop(self, hook: Callable[[], None]) -> None:
        """Run `hook` (in the signal handler: keep it to setting flags) when the daemon is told to stop."""
        self._on_stop.append(hook)

    def on_reload(self, hook: Callable[[], None]) -> None:
        """Run `hook` after SIGHUP, from the serving loop (run_reloads): reload what can change without a
        restart."""
        self._on_reload.append(hook)

    def stop(self, *_) -> None:
        """SIGTERM/SIGINT: a serving daemon finishes its loop and cleans up; one still starting (loading
        a model, say) is interrupted at once, its cleanup (finally blocks) still runs. A second signal
        changes nothing: the cleanup under way is not interrupted."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        for hook in self._on_stop:
            hook()
        if not self.serving:
            raise SystemExit(128 + signal.SIGTERM)

    def reload(self, *_) -> None:
        """SIGHUP: only note it. The hooks run in the serving loop, never in the signal handler, where one
        could wait forever for a lock the interrupted code holds, or fail on a bad file and stop the daemon."""
        self._reload_asked = True

    def run_reloads(self) -> None:
        """The reload hooks, if SIGHUP asked for them; a hook that fails is one log line and what it had
        loaded stays in use."""
        if not self._reload_asked:
            return
        self._reload_asked = False
        for hook in self._on_reload:
            try:
                hook()
            except (UserError, OSError) as exc:
                log.warning("%s: reload failed, keeping what was loaded before: %s", self.role, exc)

    def ready(self, **info: str) -> None:
        """Tell the launcher this daemon serves; `info`: what it needs to reach it."""
        self.serving = True
        self._tell(launch.Ready(self.role, os.getpid(), {k: str(v) for k, v in info.items()}))

    def failed(self, why: str) -> None:
        self._tell(launch.Failed(self.role, os.getpid(), clip(why)))

    def _tell(self, msg) -> None:
        if self._told or not self.ready_address:
            return
        self._told = True
        context = zmq.Context()  # its own: term() below returns once the message left (the daemon may exit next)
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)  # ...or after 2 s when the launcher is gone
        sock.setsockopt(zmq.SNDTIMEO, 2000)
        try:
            sock.connect(self.ready_address)
            sock.send_multipart(msg.to_frames())
        except zmq.ZMQError as exc:
            log.warning("%s: could not tell the launcher at %s: %s", self.role, self.ready_address, exc)
        finally:
            sock.close()
            context.term()


def run_daemon(role: str, main: Callable, config, verbose: bool = False, ready_address: str | None = None) -> int:
    """The one entry of every daemon: set up, run `main(config, runtime)`, end the process with its exit
    code (a daemon's process is its own: this does not return once `main` has run).

    A UserError (a bad option, an address in use) is one log line, FAILED to the launcher and
    exit code 2. `ready_address` (or $CECOLLM_READY): the launcher waiting for READY; a daemon
    with a launcher also dies with it."""
    ready_address = ready_address or os.environ.pop(READY_ENV, None)
    setup_logging(verbose)
    runtime = Runtime(role, ready_address)
    signal.signal(signal.SIGTERM, runtime.stop)  # before anything starts: a signal never skips the cleanup
    signal.signal(signal.SIGINT, runtime.stop)
    signal.signal(signal.SIGHUP, runtime.reload)
    if ready_address:
        parent = os.getppid()
        die_with_parent()
        if os.getppid() != parent:  # the launcher died before the signal was armed
            return 1
    try:
        code = int(main(config, runtime) or 0)
    except UserError as exc:
        log.error("%s: %s", role, exc)
        runtime.failed(str(exc))
        code = 2
    except BaseException as exc:
        runtime.failed(f"{type(exc).__name__}: {exc}")
        raise
    exit_now(code)


def exit_now(code: int) -> None:
    """End the process with `code` now. A daemon's main cleans up all it holds (segments, sockets, children)
    before it returns; what is left is the interpreter's own teardown, which with torch loaded takes about a
    second and would make SIGTERM slow."""
    logging.shutdown()  # flushes every handler
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


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


class ReadyWaiter:
    """The launcher's READY socket: a PULL bound on a fresh ipc path."""

    _count = 0

    def __init__(self) -> None:
        ReadyWaiter._count += 1
        path = Path(tempfile.gettempdir()) / f"cecollm-ready-{os.getpid()}-{ReadyWaiter._count}.ipc"
        self.path = path
        self.address = f"ipc://{path}"
        self.socket = zmq.Context.instance().socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.address)

    def wait(self, alive: Callable[[], bool], timeout: float, what: str) -> launch.Ready:
        """READY from the daemon; a CecollmError when it says FAILED, exits, or is silent past `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.poll(200):
                try:
                    msg = launch.parse(self.socket.recv_multipart())
                except ProtocolError as exc:
                    log.warning("launcher: a message that is not READY: %s", exc)
                    continue
                if isinstance(msg, launch.Failed):
                    raise CecollmError(f"the {what} did not start: {msg.message}")
                return msg
            if not alive():
                raise CecollmError(f"the {what} exited before it was ready")
        raise CecollmError(f"the {what} was not ready within {timeout:g} s")

    def close(self) -> None:
        self.socket.close(0)
        self.path.unlink(missing_ok=True)


class DaemonProcess:
    """A cecollm daemon run as a command in a subprocess: waits for its READY (whose info is
    `self.info`), dies with this process, and `with` (or stop()) ends it with SIGTERM and waits."""

    what = "server"  # named in the error when it does not start

    def __init__(self, args: list[str], threads: int = 1, log_path: str | Path | None = None,
                 start_timeout: float = 180.0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        waiter = ReadyWaiter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), READY_ENV: waiter.address}
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._log, env=env)
        try:
            self.ready = waiter.wait(lambda: self.proc.poll() is None, start_timeout, self.what)
        except CecollmError as exc:
            self.stop()
            where = f"; see {self.log_path}" if self.log_path else ""
            raise CecollmError(f"{exc} (exit code {self.proc.returncode}){where}") from None
        finally:
            waiter.close()
        self.info = dict(self.ready.info)

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
