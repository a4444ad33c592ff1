"""The process runtime: READY and FAILED reach the launcher, signals stop and reload a daemon,
a daemon dies with its launcher, and junk on the READY socket is not taken for READY."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq

from cecollm.errors import CecollmError
from cecollm.runtime import DaemonProcess, ReadyWaiter

DAEMON = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cecollm.errors import UserError
    from cecollm.runtime import run_daemon

    def main(config, runtime):
        mode, out = config
        if mode == "fail":
            raise UserError("the port is taken")
        if mode == "exit":
            return 3
        if mode == "silent":
            time.sleep(30)
        runtime.on_reload(lambda: Path(out).write_text("reloaded"))
        runtime.ready(address="tcp://127.0.0.1:1", mode=mode)
        while runtime.running:  # a serving loop: the reload hooks run here, after SIGHUP, not in the handler
            runtime.run_reloads()
            time.sleep(0.02)
        Path(out + ".stopped").write_text("clean")
        return 0

    sys.exit(run_daemon("test-daemon", main, (sys.argv[1], sys.argv[2])))
""")


def _daemon(tmp_path, mode: str, timeout: float = 30.0) -> DaemonProcess:
    return DaemonProcess([sys.executable, "-c", DAEMON, mode, str(tmp_path / "out")], start_timeout=timeout)


def test_ready_carries_the_daemons_info_and_sigterm_stops_it_cleanly(tmp_path):
    d = _daemon(tmp_path, "serve")
    try:
        assert d.info == {"address": "tcp://127.0.0.1:1", "mode": "serve"}
        assert d.ready.role == "test-daemon" and d.ready.pid == d.proc.pid
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not (tmp_path / "out").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "out").read_text() == "reloaded" and d.proc.poll() is None  # SIGHUP reloads, no exit
    finally:
        code = d.stop()
    assert code == 0 and (tmp_path / "out.stopped").read_text() == "clean"


@pytest.mark.parametrize("mode, said", [("fail", "did not start: the port is taken"),
                                        ("exit", "exited before it was ready"),
                                        ("silent", "was not ready within 1 s")])
def test_a_daemon_that_does_not_start_is_one_error_naming_why(tmp_path, mode, said):
    with pytest.raises(CecollmError, match=said) as caught:
        _daemon(tmp_path, mode, timeout=1.0 if mode == "silent" else 30.0)
    assert "exit code" in str(caught.value)


def test_junk_on_the_ready_socket_is_not_ready():
    waiter = ReadyWaiter()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(waiter.address)
    try:
        for junk in ([b"CL\x01\x01", b"\xc1"], [b"xx"], [b"CL\x01\x01", b"\x93\xa1r\x01\x80", b"extra"]):
            push.send_multipart(junk)
        with pytest.raises(CecollmError, match="not ready within"):
            waiter.wait(lambda: True, 1.0, "daemon")
    finally:
        push.close()
        waiter.close()
    assert not waiter.path.exists()


LAUNCHER = textwrap.dedent("""
    import sys
    from cecollm.runtime import DaemonProcess
    d = DaemonProcess([sys.executable, "-c", sys.argv[1], "serve", sys.argv[2]])
    print(d.proc.pid, flush=True)
    import time
    time.sleep(60)
""")


def test_a_launched_daemon_dies_with_its_launcher(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, DAEMON, str(tmp_path / "out")],
                                stdout=subprocess.PIPE, text=True)
    try:
        pid = int(launcher.stdout.readline())
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and \
                open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            time.sleep(0.05)
        assert (tmp_path / "out.stopped").read_text() == "clean"  # SIGTERM from the parent-death signal, cleaned up
    finally:
        if launcher.poll() is None:
            launcher.kill()
