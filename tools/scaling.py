#!/usr/bin/env python3
"""How far one cloud worker scales: one edge trace replayed from 1..32 devices, batched and unbatched
(issue 14; cecollm.loadgen.scaling and scaling_report).

    # record a trace of 8 Alpaca prompts, then 1..32 devices, each point 30 s, both modes (~9 min on 2 cores)
    .venv/bin/python tools/scaling.py --out results/scaling
    # a short check, on a trace recorded before
    .venv/bin/python tools/scaling.py --devices 1,2,4 --duration 10 --trace results/scaling/raw/trace.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cecollm.cliutil import GuardedCommand, setup_logging
from cecollm.errors import UserError
from cecollm.loadgen.scaling import ScalingConfig

D = ScalingConfig()  # the options' defaults


def _devices(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"--devices must be device counts separated by commas, e.g. 1,2,4, got {value!r}") from None
    return tuple(sorted(set(counts)))


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--devices", default=",".join(map(str, D.devices)), show_default=True,
              help="Device counts to measure, each batched and unbatched.")
@click.option("--max-batch", type=int, default=D.max_batch,
              help="The batched mode's `cecollm-broker --max-batch` [default: the largest --devices]; the "
                   "unbatched mode always runs --max-batch 1. Passed only to a broker that has the option.")
@click.option("--workers", type=int, default=D.workers, show_default=True, help="Worker processes of the broker.")
@click.option("--threads", type=int, default=D.threads, show_default=True,
              help="Torch threads per worker (and of the recording edge).")
@click.option("--trace", default=D.trace, help="Replay this trace (tools/fanout.py --record) [default: record one "
              "into OUT/raw/trace.jsonl from --prompts, on a broker with --max-batch 1].")
@click.option("--prompts", default=D.prompts, show_default=True, help="JSONL prompts to record the trace from.")
@click.option("--n-prompts", type=int, default=D.n_prompts, show_default=True, help="Record the first N prompts.")
@click.option("--max-new-tokens", type=int, default=D.max_new_tokens, show_default=True)
@click.option("--model", default=D.model, show_default=True)
@click.option("--exits", default=D.exits, help="Exits, e.g. 8,15 [default: the model's].")
@click.option("--heads", default=D.heads, help="Exit heads file [default: the model's].")
@click.option("--threshold", type=float, default=D.threshold, show_default=True,
              help="The recording edge's exit threshold (the paper's mode).")
@click.option("--duration", type=float, default=D.duration, show_default=True,
              help="Seconds each point replays, round the trace (0: each generation once per device).")
@click.option("--pace", type=float, default=D.pace, show_default=True,
              help="Recorded edge time x this: 1 is the trace's request rate, 0 requests back to back.")
@click.option("--stagger", type=float, default=D.stagger, show_default=True,
              help="Devices start at random offsets in [0, STAGGER) seconds.")
@click.option("--timeout", type=float, default=D.timeout, show_default=True,
              help="Seconds a request may take before it counts as a timeout.")
@click.option("--latency-target-ms", type=float, default=D.latency_target_ms, show_default=True,
              help="The p99 a device count must stay under to count as served.")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Seeds the start offsets.")
@click.option("--broker-arg", "broker_args", multiple=True,
              help="One more option for each broker, as one word (--broker-arg=--budget-mb=2048); repeatable.")
@click.option("--out", default=D.out, show_default=True, help="Directory for raw.jsonl, report.md, scaling.png, "
              "and raw/ (the trace, the brokers' logs).")
@click.option("--from-raw", default="", help="Only write report.md and the plot again from this raw.jsonl "
              "(beside it).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool, from_raw: str, **options) -> None:
    """Replay one recorded edge trace (the paper's mode: threshold 0.8, no exact verification) from each
    --devices count against ONE broker with --workers workers at --threads torch threads, once with
    `--max-batch N` (batched) and once with `--max-batch 1` (unbatched), a fresh broker per point.

    Per point: cloud tokens per second, request latency p50/p99 (client side), the batch sizes the broker
    handed its workers (its cecollm_broker_batch_size histogram: mean, max, counts; n/a when it has none),
    the content manager's peak memory, errors, timeouts and mismatches (a reply that differs from the
    recorded token). Then batched/unbatched ratios and, per mode, the largest device count whose p99 stays
    under --latency-target-ms at the trace's request rate.

    Writes OUT/raw.jsonl (a header line, then a line per point as it finishes), OUT/report.md and
    OUT/scaling.png, and prints the table. Exit code 1 when a point had errors, timeouts or mismatches or
    failed; 2 for bad input (one line)."""
    from cecollm.loadgen.scaling import check_scaling, load_raw
    from cecollm.loadgen.scaling_report import summary, write_report

    setup_logging(verbose)
    config = ScalingConfig(**{**options, "devices": _devices(options["devices"]),
                              "broker_args": tuple(options["broker_args"])})
    if from_raw:
        header, rows = load_raw(from_raw)
    else:
        check_scaling(config)
        header, rows = _run(config)
    out = Path(from_raw).parent if from_raw else Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    report, text = write_report(out, header, rows)
    click.echo(text)
    click.echo(f"wrote {report}", err=True)
    s = summary(header, rows)
    if s["errors"] or s["timeouts"] or s["failed_points"]:
        sys.exit(1)


def _run(config: ScalingConfig):
    from tqdm import tqdm

    from cecollm.loadgen.scaling import run_scaling

    bars: list = []

    def progress_for(what: str, total: int):
        for bar in bars:
            bar.close()
        bars[:] = [tqdm(total=total or None, desc=what, unit="gen", file=sys.stderr, leave=False)]
        return bars[0].update

    def on_point(row: dict) -> None:
        for bar in bars:
            bar.close()
        bars.clear()
        if "failed" in row:
            click.echo(f"{row['mode']:>9} x{row['devices']:<3} failed: {row['failed']}", err=True)
            return
        click.echo(f"{row['mode']:>9} x{row['devices']:<3} {row['cloud_tokens_per_s']:8.2f} tokens/s, p50 "
                   f"{row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms, batch mean {row['batch_mean']}, "
                   f"errors {row['errors']}, mismatches {row['mismatches']}, timeouts {row['timeouts']} "
                   f"({row['seconds_spent']:.0f} s)", err=True)

    points = 2 * len(config.devices)
    click.echo(f"scaling: {points} points ({','.join(map(str, config.devices))} devices x batched/unbatched), "
               f"{config.workers} worker(s), {config.duration:g} s each" if config.duration else
               f"scaling: {points} points, each generation once per device", err=True)
    try:
        return run_scaling(config, on_point, progress_for)
    finally:
        for bar in bars:
            bar.close()


if __name__ == "__main__":
    main()
