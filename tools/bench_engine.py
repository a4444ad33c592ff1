#!/usr/bin/env python3
"""Tokens/s of the split engine's `cloud` mode (what `cecollm generate --mode cloud` runs) next to
transformers' own `generate(do_sample=False)`, on the same prompts, one thread, in the same process.

Runs are interleaved (ours, theirs, ours, ...) and each prompt's best of --repeats is kept, so
background load hits both sides alike. Also shows `collab` at threshold 1.0 (the split path with
the cloud partition fed from uploaded hidden states) for reference.

    .venv/bin/python tools/bench_engine.py --n 5 --max-new-tokens 32
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import orjson
import torch

from cecollm.cliutil import GuardedCommand, setup_logging
from cecollm.config import DEFAULT_MODEL, GenerationConfig
from cecollm.edge.heads import edge_setup
from cecollm.engine import SplitEngine
from cecollm.errors import UserError
from cecollm.loading import load_model
from cecollm.prompting import encode_prompt
from cecollm.spec import ModelSpec

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca.jsonl"


def read_prompts(path: Path, n: int) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompts file not found: {path} (pass --prompts FILE.jsonl)")
    prompts = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = orjson.loads(line)
            text = rec.get("prompt") or (rec.get("instruction", "") + ("\n" + rec["input"] if rec.get("input") else ""))
            prompts.append(text)
        if len(prompts) == n:
            break
    return prompts


def time_hf(model, ids, max_new_tokens) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)
    return time.perf_counter() - t0, out[0, len(ids):].tolist()


def time_ours(engine, ids, config) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    result = engine.generate(ids, config)
    return time.perf_counter() - t0, result.token_ids


@click.command(cls=GuardedCommand)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--prompts", type=click.Path(path_type=Path), default=DEFAULT_PROMPTS, show_default=True,
              help="JSONL with 'prompt' or 'instruction'(+'input') fields.")
@click.option("--n", default=5, show_default=True, help="Number of prompts.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Runs per prompt and side; the best is kept.")
@click.option("--threads", default=1, show_default=True)
def main(model, prompts, n, max_new_tokens, repeats, threads):
    """Print tokens/s of our engine and of transformers' generate, and their ratio."""
    setup_logging()
    torch.set_num_threads(threads)
    loaded = load_model(model)
    split, heads = edge_setup(ModelSpec(model), loaded)
    engine = SplitEngine(loaded.model, split, heads)
    cloud = GenerationConfig(mode="cloud", max_new_tokens=max_new_tokens)
    collab = GenerationConfig(mode="collab", threshold=1.0, max_new_tokens=max_new_tokens, fp16=False)
    totals = {"transformers": [0.0, 0], "cecollm cloud": [0.0, 0], "cecollm collab@1.0": [0.0, 0]}
    mismatches = 0
    with torch.inference_mode():
        for i, prompt in enumerate(read_prompts(prompts, n)):
            ids = encode_prompt(loaded.tokenizer, prompt)
            time_hf(loaded.model, ids, 4)  # warm-up
            best = {k: float("inf") for k in totals}
            for _ in range(repeats):
                t, ref = time_hf(loaded.model, ids, max_new_tokens)
                best["transformers"] = min(best["transformers"], t)
                t, ours = time_ours(engine, ids, cloud)
                best["cecollm cloud"] = min(best["cecollm cloud"], t)
                t, split_ids = time_ours(engine, ids, collab)
                best["cecollm collab@1.0"] = min(best["cecollm collab@1.0"], t)
                mismatches += (ours != ref) + (split_ids != ref)
            for k in totals:
                totals[k][0] += best[k]
                totals[k][1] += len(ref)
            print(f"prompt {i + 1}: {len(ids)} prompt tokens, {len(ref)} generated", file=sys.stderr)
    base = totals["transformers"][1] / totals["transformers"][0]
    print(f"\n{'':22} {'tokens/s':>9} {'vs transformers':>16}   (model {model}, {threads} thread, {n} prompts x "
          f"{max_new_tokens} tokens, best of {repeats})")
    for k, (seconds, tokens) in totals.items():
        rate = tokens / seconds
        print(f"{k:22} {rate:9.2f} {rate / base:15.3f}x")
    print(f"token mismatches against transformers: {mismatches}")


if __name__ == "__main__":
    main()
