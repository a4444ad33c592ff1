#!/usr/bin/env python3
"""Many edge devices against one broker, each with its own device id (cecollm.loadgen.fanout).

    # record what one real edge sends (at threshold 0.8), then replay it as 1..5 devices
    .venv/bin/python tools/fanout.py --record --trace /tmp/t.jsonl --prompts ../shared/data/alpaca.jsonl \\
        --n-prompts 4 --broker tcp://127.0.0.1:5555 --clients 3 --json -
    .venv/bin/python tools/fanout.py --trace /tmp/t.jsonl --broker tcp://127.0.0.1:5555 --clients 5
"""

from __future__ import annotations

import sys

import click
import orjson

from cecollm.cliutil import GuardedCommand, setup_logging
from cecollm.errors import UserError
from cecollm.loadgen.config import FanoutConfig


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MB"


def _print_summary(report) -> None:
    r = report
    click.echo(f"fanout {r.mode}: {r.clients} devices, {r.generations} generations, {r.requests} cloud requests "
               f"in {r.wall_seconds:.2f} s")
    click.echo(f"  latency per request: p50 {r.latency_p50_ms} ms, p99 {r.latency_p99_ms} ms "
               f"(mean {r.latency_mean_ms}, max {r.latency_max_ms})")
    click.echo(f"  cloud: {r.cloud_tokens} tokens, {r.cloud_tokens_per_s:.2f} tokens/s, "
               f"{r.cloud_seconds:.2f} s of worker compute; edge tokens {r.edge_tokens}")
    click.echo(f"  errors {r.errors} (mismatches {r.mismatches}), timeouts {r.timeouts}, sessions reopened "
               f"{r.reuploads}")
    for m in r.error_messages:
        click.echo(f"    {m}")
    if r.cm_pid is None:
        click.echo(f"  content manager memory: not measured ({r.memory_note})")
    else:
        click.echo(f"  content manager {r.cm_pid}: RSS {_mb(r.cm_rss_idle)} idle, {_mb(r.cm_rss_peak)} peak, "
                   f"{_mb(r.cm_rss_end)} end; PSS {_mb(r.cm_pss_idle)} / {_mb(r.cm_pss_peak)} / {_mb(r.cm_pss_end)}; "
                   f"device segments in /dev/shm {_mb(r.shm_peak)} peak")


D = FanoutConfig()  # the options' defaults


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--clients", type=int, default=D.clients, show_default=True,
              help="Devices running at once; device ids are --device-base + 0..N-1.")
@click.option("--broker", default=D.broker, show_default=True, help="The broker's request address.")
@click.option("--upload", default=D.upload, help="The broker's upload address [default: request port + 1].")
@click.option("--prompts", default="", help="JSONL prompts (\"prompt\", or \"instruction\" + \"input\"): "
              "what --record and live mode generate from.")
@click.option("--n-prompts", type=int, default=D.n_prompts, show_default=True, help="Use the first N prompts (0: all).")
@click.option("--raw", is_flag=True, help="Prompts as they are, without the chat template.")
@click.option("--mode", type=click.Choice(["replay", "live"]), default=D.mode, show_default=True,
              help="replay: devices replay --trace (edge compute replaced by sleeping its recorded time); "
                   "live: every device is a real EdgeClient.")
@click.option("--trace", default=D.trace, help="The trace file (rows in TRACE.rows.npy beside it).")
@click.option("--record", is_flag=True, help="First record --trace from one real edge run over --prompts "
              "(a generation with timeouts or fallbacks is refused), then run the fanout.")
@click.option("--model", default=D.model, show_default=True, help="Live/record: the edge's model.")
@click.option("--heads", default=D.heads, help="Live/record: exit heads file [default: the model's].")
@click.option("--exits", default=D.exits, help="Live/record: exits, e.g. 8,15 [default: the model's].")
@click.option("--upload-layer", type=int, default=D.upload_layer,
              help="Live/record: uploaded layer [default: last exit].")
@click.option("--threshold", type=float, default=D.threshold, show_default=True, help="Live/record: exit threshold.")
@click.option("--no-fp16", is_flag=True, help="Live/record: float32 rows on the wire.")
@click.option("--max-new-tokens", type=int, default=D.max_new_tokens, show_default=True)
@click.option("--timeout", type=float, default=D.timeout, show_default=True,
              help="Seconds a request may take before it counts as a timeout.")
@click.option("--pace", type=float, default=D.pace, show_default=True,
              help="Replay: recorded edge time x this (0: requests back to back, a stress test).")
@click.option("--stagger", type=float, default=D.stagger, show_default=True,
              help="Devices start at random offsets in [0, STAGGER) seconds.")
@click.option("--no-rotate", is_flag=True, help="Every device starts at the first prompt (lockstep).")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Seeds the start offsets.")
@click.option("--duration", type=float, default=D.duration, show_default=True,
              help="Replay: go round the trace's generations until this many seconds pass (0: each once).")
@click.option("--device-base", type=int, default=D.device_base, show_default=True)
@click.option("--broker-pid", type=int, default=D.broker_pid,
              help="The broker's pid: its content manager is measured "
                   "[default: the process bound to the upload address].")
@click.option("--cm-pid", type=int, default=D.cm_pid, help="The content manager's pid, if known.")
@click.option("--keys", default=D.keys, help="A device key bundle whose ids cover every client's "
              "(`cecollm keys --device fanout=1000-1999`) [default: $CECOLLM_HOME/keys/bundles/device-<id>].")
@click.option("--insecure", is_flag=True, help="No keys: for a broker started with --insecure.")
@click.option("--json", "json_path", default=None, help="Write the report as JSON to this file ('-': stdout).")
@click.option("--threads", type=int, default=D.threads, show_default=True, help="Torch threads (live/record).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(record: bool, no_fp16: bool, no_rotate: bool, json_path: str | None, verbose: bool, **options) -> None:
    """Run --clients edge devices at once against one broker and report per-request latency
    (p50/p99), cloud tokens/s, errors and timeouts, and the content manager's memory (RSS/PSS).

    replay (default) replays a trace recorded from one real edge: the same uploads and cloud
    requests at the recorded pace, with the edge's compute replaced by sleeping its time, so the
    cloud does its real work for N devices while the edge side costs nothing; every reply must
    equal the recorded token (mismatches are errors). live runs N real edges in threads: on a
    2-core machine they fight the cloud for the CPU, so prefer replay to measure the cloud.

    Exit code 1 when a request failed, timed out or (replay) got another token than recorded;
    2 for bad input (one line)."""
    from cecollm.loadgen.config import check_config, read_prompt_texts
    from cecollm.loadgen.fanout import run_fanout
    from cecollm.loadgen.live import record_trace

    config = FanoutConfig(fp16=not no_fp16, rotate=not no_rotate, **options)
    check_config(config)
    setup_logging(verbose)
    from tqdm import tqdm

    from cecollm.loadgen.trace import Trace

    if record or config.mode == "live" or config.prompts:
        texts = read_prompt_texts(config)  # a bad --prompts is an error even where replay does not need it
    if record:
        if not config.trace:
            raise UserError("--record needs --trace FILE to write")
        with tqdm(total=len(texts), desc="record", unit="gen", file=sys.stderr) as bar:
            trace = record_trace(config, progress=bar.update)
        click.echo(f"trace {config.trace}: {orjson.dumps(trace.summary()).decode()}", err=True)
    if config.mode == "replay":
        per_client = len(Trace.load(config.trace).generations) if config.trace else 0
    else:
        per_client = len(texts)
    with tqdm(total=None if config.duration else per_client * config.clients, desc=f"{config.mode} x{config.clients}", unit="gen",
              file=sys.stderr) as bar:
        report = run_fanout(config, progress=bar.update)
    if json_path == "-":
        sys.stdout.buffer.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        _print_summary(report)
        if json_path:
            try:
                with open(json_path, "wb") as out:
                    out.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
            except OSError as exc:
                raise UserError(f"cannot write {json_path}: {exc.strerror}") from None
    if report.errors or report.timeouts:
        sys.exit(1)


if __name__ == "__main__":
    main()
