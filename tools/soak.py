#!/usr/bin/env python3
"""A soak: many devices for a long time while workers and the content manager are killed.

    .venv/bin/python tools/soak.py --minutes 10 --clients 8 --out results/soak

Starts a broker with keys and two workers on the default model, records a trace of one real edge
on the first Alpaca prompts, then replays it from --clients devices at the recorded pace (fanout
replay, round and round) for --minutes, while a chaos loop SIGKILLs a random worker every
--kill-every seconds and the content manager once, halfway. Every reply is checked against the
recorded token. Writes soak.json and report.md to --out: tokens served, mismatches, timeouts,
sessions reopened, errors, request latency p50/p99, the peak memory of the broker's processes,
every kill, whether every device finished (no hang) and how long SIGTERM took to stop the cloud.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from cecollm.cliutil import GuardedCommand, setup_logging

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca.jsonl"


class Chaos(threading.Thread):
    """Kills a random worker of the broker every `every` seconds, and its content manager once at `manager_at`."""

    def __init__(self, broker, every: float, manager_at: float, seed: int) -> None:
        super().__init__(name="chaos", daemon=True)
        self.broker, self.every, self.manager_at = broker, every, manager_at
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.kills: list[dict] = []

    def run(self) -> None:
        import psutil

        t0 = time.monotonic()
        next_kill, manager_killed = self.every, False
        while not self.done.wait(0.5):
            now = time.monotonic() - t0
            if not manager_killed and now >= self.manager_at:
                manager_killed = self._kill(self.broker.content_manager_pid(), "content manager", now)
            if now >= next_kill:
                manager = self.broker.content_manager_pid()
                if not manager:  # a content manager is starting: it could pass for a worker; wait a round
                    continue
                workers = [p.pid for p in psutil.Process(self.broker.proc.pid).children()
                           if p.pid != manager and p.is_running() and "spawn_main" in " ".join(p.cmdline())
                           and "resource_tracker" not in " ".join(p.cmdline())]
                if workers:
                    self._kill(self.rng.choice(workers), "worker", now)
                next_kill += self.every

    def _kill(self, pid: int, what: str, at: float) -> bool:
        if not pid:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.kills.append({"at_s": round(at, 1), "what": what, "pid": pid})
        click.echo(f"soak: {at:6.1f} s  SIGKILL {what} {pid}", err=True)
        return True


class TreeMemory(threading.Thread):
    """Samples the resident memory of the broker's whole process tree (and the largest single process)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(name="memory", daemon=True)
        self.pid, self.interval = pid, interval
        self.done = threading.Event()
        self.peak_total = self.peak_one = 0

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.done.wait(self.interval):
            sizes = []
            for proc in [root, *root.children(recursive=True)]:
                try:
                    sizes.append(proc.memory_info().rss)
                except psutil.Error:
                    continue
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_one = max(self.peak_one, max(sizes, default=0))


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--minutes", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@click.option("--clients", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--kill-every", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              help="Seconds between SIGKILLs of a random worker.")
@click.option("--prompts", type=click.IntRange(min=1), default=8, show_default=True,
              help="Alpaca prompts in the recorded trace.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--data", type=click.Path(dir_okay=False), default=str(DEFAULT_DATA), show_default=True)
@click.option("--model", default="SmolLM2-135M-Instruct", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds which worker is killed.")
@click.option("--out", type=click.Path(file_okay=False), default="results/soak", show_default=True)
def main(minutes, clients, kill_every, prompts, max_new_tokens, data, model, seed, out):
    """Replay one edge's trace from many devices for a long time while the cloud's processes are killed."""
    from cecollm.broker.launch import BrokerProcess
    from cecollm.loadgen.config import FanoutConfig
    from cecollm.loadgen.fanout import run_fanout
    from cecollm.loadgen.live import record_trace
    from cecollm.prompting import read_records, record_prompt

    setup_logging()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = tuple(record_prompt(r) for r in read_records(data)[:prompts])
    work = Path(tempfile.mkdtemp(prefix="cecollm-soak-"))
    duration = minutes * 60
    with BrokerProcess(model, workers=2, log_path=out / "broker.log", keys_dir=work / "keys") as broker:
        common = dict(broker=broker.request_address, upload=broker.upload_address, model=model,
                      keys=broker.device_keys, trace=str(work / "trace.jsonl"), broker_pid=broker.proc.pid)
        click.echo(f"soak: recording a trace of {len(texts)} prompts", err=True)
        trace = record_trace(FanoutConfig(prompts=texts, max_new_tokens=max_new_tokens, **common))
        chaos = Chaos(broker, kill_every, duration / 2, seed)
        memory = TreeMemory(broker.proc.pid)
        config = FanoutConfig(mode="replay", clients=clients, duration=duration, timeout=20.0, **common)
        reports: list = []
        runner = threading.Thread(target=lambda: reports.append(run_fanout(config)), daemon=True)
        click.echo(f"soak: {clients} devices for {minutes:g} min, a worker killed every {kill_every:g} s, the "
                   "content manager once", err=True)
        t0 = time.monotonic()
        for thread in (memory, chaos, runner):
            thread.start()
        runner.join(duration + 120)  # every device ends its request within its timeout after the duration
        hung = runner.is_alive()
        ran = time.monotonic() - t0
        chaos.done.set()
        memory.done.set()
        stop_began = time.monotonic()
        broker.stop()
        stop_seconds = time.monotonic() - stop_began
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"cecollm-{broker.proc.pid}-")]
    report = reports[0].to_dict() if reports else {}
    summary = {
        "command": " ".join(sys.argv), "model": model, "clients": clients, "minutes": minutes,
        "kill_every_s": kill_every, "trace": trace.summary(), "ran_s": round(ran, 1), "hung": hung,
        "generations": report.get("generations"), "cloud_tokens": report.get("cloud_tokens"),
        "requests": report.get("requests"), "mismatches": report.get("mismatches"),
        "timeouts": report.get("timeouts"), "errors": report.get("errors"), "reuploads": report.get("reuploads"),
        "latency_p50_ms": report.get("latency_p50_ms"), "latency_p99_ms": report.get("latency_p99_ms"),
        "latency_max_ms": report.get("latency_max_ms"), "cloud_tokens_per_s": report.get("cloud_tokens_per_s"),
        "peak_rss_tree_mb": round(memory.peak_total / 2**20, 1), "peak_rss_one_process_mb": round(memory.peak_one / 2**20, 1),
        "kills": chaos.kills, "sigterm_to_exit_s": round(stop_seconds, 2), "broker_exit_code": broker.proc.returncode,
        "shm_left": left, "error_messages": report.get("error_messages", []),
    }
    (out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(summary))
    click.echo(_markdown(summary))
    sys.exit(1 if hung or summary["mismatches"] or not reports else 0)


def _markdown(s: dict) -> str:
    kills = ", ".join(f"{k['what']} at {k['at_s']:g} s" for k in s["kills"]) or "none"
    return "\n".join([
        "# Soak", "", f"`{s['command']}`", "",
        f"{s['clients']} devices replayed one recorded edge ({s['trace']['generations']} generations, "
        f"{s['model']}) for {s['minutes']:g} minutes against a broker with two workers; a worker was SIGKILLed every "
        f"{s['kill_every_s']:g} s and the content manager once.", "",
        "| | |", "|---|---:|",
        f"| generations | {s['generations']} |",
        f"| cloud tokens served | {s['cloud_tokens']} ({s['cloud_tokens_per_s']} per s) |",
        f"| mismatches against the recorded tokens | {s['mismatches']} |",
        f"| requests timed out (the edge decides those itself) | {s['timeouts']} |",
        f"| errors (mismatches and refused requests included) | {s['errors']} |",
        f"| sessions reopened after the cloud lost them | {s['reuploads']} |",
        f"| request latency p50 / p99 / max (ms) | {s['latency_p50_ms']} / {s['latency_p99_ms']} / "
        f"{s['latency_max_ms']} |",
        f"| peak resident memory, broker tree / largest process (MiB) | {s['peak_rss_tree_mb']} / "
        f"{s['peak_rss_one_process_mb']} |",
        f"| every device finished (no hang) | {'no' if s['hung'] else 'yes'} |",
        f"| SIGTERM to exit at the end (s) | {s['sigterm_to_exit_s']} (exit code {s['broker_exit_code']}) |",
        f"| segments left in /dev/shm | {len(s['shm_left'])} |", "",
        f"Kills: {kills}.", "",
        *([f"First errors: {'; '.join(s['error_messages'])}", ""] if s["error_messages"] else []),
    ])


if __name__ == "__main__":
    main()
