#!/usr/bin/env python3
"""Tokens/s and time to first token of the split engine's `cloud` mode (what `cecollm generate
--mode cloud` runs), next to transformers' own `generate(do_sample=False)` and, as the peer a user
would otherwise run, llama.cpp through llama-cpp-python on the GGUF file the model came from; same
prompt token ids, same thread count, same process.

Runs are interleaved (ours, transformers, llama.cpp, ours, ...) and each prompt's best of --repeats is
kept, so background load hits every side alike. Ours runs once per --dtypes entry (the model loaded
in that dtype, as `cecollm generate --dtype`). `collab` at threshold 1.0 (the split
path with the cloud partition fed from uploaded hidden states) is shown for reference. llama.cpp is
skipped with a note where llama-cpp-python is not installed (`pip install .[peer]`, a long build),
or when --model is not a GGUF file or the default model.

    .venv/bin/python tools/bench_engine.py --n 5 --max-new-tokens 64 --threads 1,2

llama-cpp-python built with -DGGML_NATIVE=ON on a CPU with AMX (as this machine's) used ggml's AMX
buffers and crashed (SIGSEGV) on any prompt of more than one token: build it with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ... -DGGML_AMX_INT8=OFF" (results/bench-engine/README.md).
"""

from __future__ import annotations

import importlib.util
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
from cecollm.loading import default_model_gguf
from cecollm.prompting import encode_prompt
from cecollm.spec import ModelSpec

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_in(spec: ModelSpec, dtype: str):
    """The model as `cecollm generate --dtype DTYPE` loads it."""
    import dataclasses

    return dataclasses.replace(spec, dtype=dtype).load()


class Timer:
    """Time to the first token and to the end of one generation."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first = None

    def token(self, *_) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.t0

    def done(self) -> tuple[float, float]:
        return time.perf_counter() - self.t0, self.first or 0.0


def time_hf(model, ids, max_new_tokens):
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)
    return time.perf_counter() - t0, 0.0, out[0, len(ids):].tolist()


def time_ours(engine, ids, config):
    timer = Timer()
    result = engine.generate(ids, config, on_token=timer.token)
    return *timer.done(), result.token_ids


def time_llama(llm, ids, max_new_tokens, eos):
    """Greedy llama.cpp on the same prompt ids, stopping where ours stops (an end token or the limit)."""
    llm.reset()  # no prefix reuse between runs: the prompt is evaluated every time
    timer = Timer()
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        timer.token()
        out.append(int(token))
        if token in eos or len(out) == max_new_tokens:
            break
    return *timer.done(), out


def peer_gguf(model: str) -> tuple[Path | None, str]:
    """The GGUF file for llama.cpp and a note when there is none."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama.cpp column skipped: llama-cpp-python is not installed (pip install '.[peer]')"
    if model == DEFAULT_MODEL:
        return default_model_gguf(), ""
    if model.endswith(".gguf") and Path(model).is_file():
        return Path(model), ""
    return None, "llama.cpp column skipped: --model is not a .gguf file or the default model"


@click.command(cls=GuardedCommand)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--prompts", type=click.Path(path_type=Path), default=DEFAULT_PROMPTS, show_default=True,
              help="JSONL with 'prompt' or 'instruction'(+'input') fields.")
@click.option("--n", default=5, show_default=True, help="Number of prompts.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Runs per prompt and side; the best is kept.")
@click.option("--threads", default="1", show_default=True, help="Thread counts to run, comma-separated (1,2).")
@click.option("--dtypes", default="float32,bfloat16,float16", show_default=True,
              help="Our compute dtypes, comma-separated (float32, bfloat16, float16), each run against the peer.")
@click.option("--transformers/--no-transformers", "with_hf", default=True, show_default=True,
              help="Also time transformers' generate (the reference for token mismatches).")
def main(model, prompts, n, max_new_tokens, repeats, threads, dtypes, with_hf):
    """Print tokens/s and time to first token of our engine, transformers and llama.cpp, and ratios."""
    setup_logging()
    thread_counts = [int(t) for t in threads.split(",") if t.strip()]
    dtype_names = [d.strip() for d in dtypes.split(",") if d.strip()]
    for d in dtype_names:
        if d not in DTYPES:
            raise UserError(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    spec = ModelSpec(model)
    engines, notes = {}, []
    base = None
    for d in dtype_names:
        loaded = load_in(spec, d)
        split, heads = edge_setup(spec, loaded)
        engines[d] = SplitEngine(loaded.model, split, heads)
        base = base or loaded
    hf = None
    if with_hf:
        from cecollm.loading import load_model

        hf = load_model(model).model
    gguf, note = peer_gguf(model)
    if note:
        notes.append(note)
    texts = read_prompts(prompts, n)
    all_ids = [encode_prompt(base.tokenizer, t) for t in texts]
    eos = engines[next(iter(engines))].eos
    cloud = GenerationConfig(mode="cloud", max_new_tokens=max_new_tokens)
    collab = GenerationConfig(mode="collab", threshold=1.0, max_new_tokens=max_new_tokens, fp16=False)
    print(f"model {model}; {n} prompts x up to {max_new_tokens} tokens, best of {repeats}; torch {torch.__version__}"
          + (f"; llama.cpp on {gguf.name}" if gguf else ""))
    for note in notes:
        print(note)
    for n_threads in thread_counts:
        torch.set_num_threads(n_threads)
        sides = {f"cecollm cloud {d}": (lambda ids, e=e: time_ours(e, ids, cloud)) for d, e in engines.items()}
        first = next(iter(engines.values()))
        sides["cecollm collab@1.0 " + next(iter(engines))] = lambda ids, first=first: time_ours(first, ids, collab)
        if hf is not None:
            sides["transformers float32"] = lambda ids: time_hf(hf, ids, max_new_tokens)
        if gguf is not None:
            from llama_cpp import Llama

            llm = Llama(str(gguf), n_threads=n_threads, n_threads_batch=n_threads, n_ctx=1024, verbose=False)
            sides["llama.cpp " + gguf.stem.rsplit(".", 1)[-1]] = lambda ids, llm=llm: time_llama(llm, ids, max_new_tokens, eos)
        run_threads(sides, all_ids, repeats, n_threads)


def run_threads(sides, all_ids, repeats, n_threads) -> None:
    """Time every side on every prompt at one thread count and print the table."""
    totals = {k: [0.0, 0, 0.0] for k in sides}  # seconds, tokens, first-token seconds
    outputs = {k: [] for k in sides}
    with torch.inference_mode():
        for i, ids in enumerate(all_ids):
            for run in sides.values():
                run(ids[:8])  # warm-up
            best = {k: (float("inf"), 0.0, []) for k in sides}
            for _ in range(repeats):
                for k, run in sides.items():
                    seconds, first, out = run(ids)
                    if seconds < best[k][0]:
                        best[k] = (seconds, first, out)
            for k, (seconds, first, out) in best.items():
                totals[k][0] += seconds
                totals[k][1] += len(out)
                totals[k][2] += first
                outputs[k].append(out)
            print(f"  prompt {i + 1}: {len(ids)} prompt tokens", file=sys.stderr)
    ref_key = next(iter(sides))  # ours, the first dtype: the reference for outputs
    peer = next((k for k in sides if k.startswith("llama.cpp")), ref_key)  # the reference for speed
    peer_rate = totals[peer][1] / totals[peer][0]
    print(f"\n{n_threads} thread(s):")
    print(f"| side | tokens/s | ÷ {peer} | first token (ms, mean) | outputs equal to {ref_key} |")
    print("|---|---:|---:|---:|---:|")
    for k, (seconds, tokens, first) in totals.items():
        rate = tokens / seconds
        same = sum(a == b for a, b in zip(outputs[k], outputs[ref_key]))
        ttft = f"{1000 * first / len(all_ids):.1f}" if first else "-"
        print(f"| {k} | {rate:.2f} | {rate / peer_rate:.3f} | {ttft} | {same}/{len(all_ids)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
