"""Sweep the exact mode's policy: which split, which threshold, and whether to wait at low confidence.

For each split (exits and heads) a broker, a baseline cloud and the link emulator run as in
`cecollm bench` (edge on one core, cloud on the other); the held-out Alpaca prompts (the last 30
records, never trained on) are generated cloud-based once, then in the exact mode for every
(threshold, wait-below) pair, interleaved per prompt. It prints, and writes as JSON and markdown,
each setting's total time per token against cloud-based in the same run, the drafts confirmed,
the roll-backs, the edge's waiting and waste, and whether every output equals cloud-based's.

    .venv/bin/python tools/exact_sweep.py --n 10 --out results/exact-sweep
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from cecollm.cliutil import GuardedCommand, setup_logging
from cecollm.errors import UserError

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca.jsonl"
SPLITS = {"22-26-trained": ("22,26", ""), "26-trained": ("26", "subset"), "24-28-lens": ("24,28", "lens"),
          "20-26-lens": ("20,26", "lens")}  # label -> (exits, heads: the model's trained, a subset of them, or the lens)


def _run_split(label, exits, heads_mode, prompts_text, args) -> list[dict]:
    import torch
    import zmq

    from cecollm.bench.baselines.edge import CloudBasedEdge
    from cecollm.bench.cloudside import CloudSide
    from cecollm.edge.client import EdgeClient, EdgeConfig
    from cecollm.edge.heads import HeadSet, edge_setup
    from cecollm.linkem import resolve_profile
    from cecollm.prompting import encode_prompt
    from cecollm.spec import ModelSpec

    spec = ModelSpec.from_options(args["model"], exits)
    loaded = spec.load()
    split, heads = edge_setup(spec, loaded)
    if heads_mode == "lens":
        heads = HeadSet.lens(loaded.model, split.exits)
    elif heads_mode == "subset":  # the model's trained heads at these exits only
        _, trained = edge_setup(ModelSpec.from_options(args["model"]), loaded)
        heads = HeadSet(exits=split.exits, heads={e: trained.heads[e] for e in split.exits}, arch=trained.arch,
                        arch_options=trained.arch_options)
    prompts = [encode_prompt(loaded.tokenizer, t) for t in prompts_text]
    plan = args["plan"]
    settings = [(t, w) for t in args["thresholds"] for w in args["waits"]]
    out = []
    with CloudSide(args["model"], exits, "", 1, resolve_profile(args["link"]), plan, Path(args["out"]) / "logs",
                   broker=True, baseline=True, broker_extra=["--capacity", "1024"]) as cloud:
        context = zmq.Context()
        a = cloud.addresses
        base = CloudBasedEdge(a.baseline, args["max_new_tokens"], 120.0, context, cloud.device_keys)
        edges = {}
        for i, (threshold, wait) in enumerate(settings):
            config = EdgeConfig(device_id=300 + i, broker=a.broker, upload=a.upload, shm=False, exact=True,
                                threshold=threshold, wait_below=wait, fp16=True,
                                max_new_tokens=args["max_new_tokens"], timeout=120.0, hello_timeout=120.0,
                                keys=cloud.device_bundle)
            edges[(threshold, wait)] = EdgeClient(loaded.model, loaded.identity, split, heads, config, context)
        totals = {key: dict(total=0.0, tokens=0, identical=0, drafts=0, rollbacks=0, waiting=0.0, wasted=0.0,
                            edge=0.0, cloud=0.0) for key in [None, *settings]}
        torch.set_num_threads(1)
        for edge in [base, *edges.values()]:  # warm-up, not counted
            edge.generate(prompts[0][:8])
        for n, ids in enumerate(prompts, 1):
            reference = None
            for key in [None, *settings]:
                edge = base if key is None else edges[key]
                t0 = time.perf_counter()
                result = edge.generate(ids)
                seconds = time.perf_counter() - t0
                s, acc = result.stats, totals[key]
                reference = result.token_ids if key is None else reference
                acc["total"] += seconds
                acc["tokens"] += len(result.token_ids)
                acc["identical"] += result.token_ids == reference
                acc["edge"] += s.edge_seconds
                acc["cloud"] += s.cloud_seconds
                if key is not None:
                    acc["drafts"] += s.drafts
                    acc["rollbacks"] += s.rollbacks
                    acc["waiting"] += s.waiting_seconds
                    acc["wasted"] += s.wasted_seconds
            click.echo(f"  {label}: prompt {n}/{len(prompts)} done", err=True)
        for edge in [base, *edges.values()]:
            edge.close()
        context.term()
    ref = totals[None]
    for key in settings:
        acc = totals[key]
        out.append({"split": label, "threshold": key[0], "wait_below": key[1], **acc,
                    "time_per_token_vs_cloud": (acc["total"] / acc["tokens"]) / (ref["total"] / ref["tokens"]),
                    "cloud_vs_cloud": acc["cloud"] / ref["cloud"], "prompts": len(prompts)})
    return out


@click.command(cls=GuardedCommand)
@click.option("--model", default="SmolLM2-135M-Instruct", show_default=True)
@click.option("--data", type=click.Path(dir_okay=False), default=str(DEFAULT_DATA), show_default=True,
              help="Alpaca JSONL; its last 30 records are the held-out prompts.")
@click.option("--n", type=click.IntRange(1, 30), default=10, show_default=True, help="Held-out prompts to use.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--link", default="wifi", show_default=True)
@click.option("--splits", default=",".join(SPLITS), show_default=True,
              help="Which of: " + ", ".join(SPLITS) + " (exits, then trained or logit-lens heads).")
@click.option("--thresholds", default="0.5,0.8,0.9,1.0", show_default=True)
@click.option("--waits", default="0,0.3", show_default=True, help="wait-below values.")
@click.option("--out", type=click.Path(file_okay=False), default="results/exact-sweep", show_default=True)
def main(model, data, n, max_new_tokens, link, splits, thresholds, waits, out):
    """Measure the exact mode's policies against cloud-based, in one run."""
    from cecollm.bench.cloudside import plan_cores
    from cecollm.prompting import read_records, record_prompt

    setup_logging()
    chosen = [s.strip() for s in splits.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SPLITS]
    if unknown:
        raise UserError(f"unknown split {unknown[0]!r}; choose from {', '.join(SPLITS)}")
    try:  # the cores are planned once: a split's cloud side pins this process (the edge) to its core
        args = dict(model=model, max_new_tokens=max_new_tokens, link=link, out=out, plan=plan_cores(True),
                    thresholds=[float(t) for t in thresholds.split(",")], waits=[float(w) for w in waits.split(",")])
    except ValueError:
        raise UserError("--thresholds and --waits take numbers separated by commas") from None
    prompts = [record_prompt(r) for r in read_records(data)[-30:][:n]]
    Path(out).mkdir(parents=True, exist_ok=True)
    rows = []
    for label in chosen:
        exits, heads_mode = SPLITS[label]
        rows += _run_split(label, exits, heads_mode, prompts, args)
        _write(out, rows)
    click.echo(_write(out, rows))


def _write(out: str, rows: list[dict]) -> str:
    """sweep.json and sweep.md from the rows so far (a split at a time: a long sweep keeps what it measured)."""
    (Path(out) / "sweep.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    lines = ["| split | threshold | wait below | time per token / cloud-based | cloud / cloud-based | drafts | "
             "roll-backs per token | waiting (s) | wasted (s) | identical |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['split']} | {r['threshold']} | {r['wait_below']} | {r['time_per_token_vs_cloud']:.3f} | "
                     f"{r['cloud_vs_cloud']:.3f} | {r['drafts']} | {r['rollbacks'] / r['tokens']:.2f} | "
                     f"{r['waiting']:.1f} | {r['wasted']:.1f} | {r['identical']}/{r['prompts']} |")
    text = "\n".join([f"`{' '.join(sys.argv)}`", "", *lines, ""])
    (Path(out) / "sweep.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
