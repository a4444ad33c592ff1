#!/usr/bin/env python3
"""The edge's OpenAI-compatible server against EdgeClient itself, in one run, same prompts.

1. Time to first token (first visible text) and tokens/s of each prompt, generated directly with
   an EdgeClient in this process and through `cecollm-edge --serve` (a subprocess, streaming chat
   completions with the official `openai` client), interleaved prompt by prompt; the ratios
   say what HTTP, JSON and Server-Sent Events cost.
2. N concurrent clients send one request each at once: every one must be served (in the order
   the server admitted them, with the same text as EdgeClient gives) or told 429; none lost.

One broker (a subprocess with one worker) serves both; the edge uses one torch thread.

    .venv/bin/python tools/bench_server.py --tiny                 # a small random Llama, seconds
    .venv/bin/python tools/bench_server.py --n 5 --max-tokens 32   # the default model
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

DEFAULT_PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
                   "Describe a cat in one sentence.", "Name three primary colors.", "How do airplanes fly?",
                   "Write a haiku about the sea.", "What is photosynthesis?", "Explain gravity to a child."]


def _tiny_model(path: Path) -> str:
    """A small random Llama with a byte-level BPE tokenizer of the same vocabulary and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DEFAULT_PROMPTS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=len(fast), max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)  # peakier distributions than the default init
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def _direct(client, tok, ids: list[int]) -> tuple[float, int, float, str]:
    """(seconds to the first visible text, tokens, seconds, text) of one EdgeClient generation."""
    from cecollm.edge.openai_api import TextCutter

    cutter, first = TextCutter(tok, []), []
    t0 = time.perf_counter()

    def on_token(record) -> None:
        if cutter.add(record.token_id) and not first:
            first.append(time.perf_counter() - t0)

    result = client.generate(ids, on_token)
    seconds = time.perf_counter() - t0
    cutter.finish()
    return (first[0] if first else seconds), len(result.token_ids), seconds, cutter.text


def _served(api, name: str, prompt: str, max_tokens: int) -> tuple[float, int, float, str]:
    """The same through the server: a streaming chat completion."""
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    for chunk in api.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, stream=True,
                                             stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    seconds = time.perf_counter() - t0
    return first or seconds, tokens, seconds, "".join(text)


def _start_server(broker, spec_options: list[str], port: int, max_tokens: int, queue: int):
    args = [sys.executable, "-c", "from cecollm.edge.cli import main; main()", *spec_options, "--broker",
            broker.request_address, "--upload", broker.upload_address, "--keys", broker.device_keys,
            "--device-id", "2", "--threshold", "1.0", "--max-new-tokens", str(max_tokens), "--queue", str(queue),
            "--serve", f"127.0.0.1:{port}", "--served-model-name", "bench"]
    log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(args, stderr=log)
    deadline = time.monotonic() + 300
    while b"serving device" not in Path(log.name).read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{Path(log.name).read_text()}")
        time.sleep(0.1)
    return proc


def _server_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the server's cecollm_time_to_first_token_seconds."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=60).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "cecollm_time_to_first_token_seconds"]
    values = {s.name: s.value for s in family.samples}
    return values["cecollm_time_to_first_token_seconds_sum"], values["cecollm_time_to_first_token_seconds_count"]


def _concurrent(url: str, prompts: list[str], expected: dict[str, str], clients: int, max_tokens: int) -> None:
    import openai

    results: list = [None] * clients
    barrier = threading.Barrier(clients)

    def one(i: int) -> None:
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        prompt = prompts[i % len(prompts)]
        barrier.wait()
        try:
            answer = api.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=max_tokens)
            results[i] = ("served", prompt, answer)
        except openai.RateLimitError:
            results[i] = ("429", prompt, None)
        except Exception as exc:  # counted as an error below
            results[i] = ("error", prompt, exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    served = [r for r in results if r and r[0] == "served"]
    refused = sum(1 for r in results if r and r[0] == "429")
    errors = [r[2] for r in results if r and r[0] == "error"]
    lost = clients - len(served) - refused - len(errors)
    extras = sorted((r[2].model_extra["cecollm"] for r in served), key=lambda e: e["request_number"])
    in_order = all(e["request_number"] - extras[0]["request_number"] == e["served_number"] - extras[0]["served_number"]
                   for e in extras)
    wrong = sum(1 for _, prompt, a in served if a.choices[0].message.content != expected[prompt])
    tokens = sum(a.usage.completion_tokens for _, _, a in served)
    print(f"\n{clients} concurrent clients: {len(served)} served, {refused} told 429, {len(errors)} errors, {lost} lost; "
          f"served in admission order: {in_order}; texts unlike EdgeClient's: {wrong}; {wall:.2f} s wall, "
          f"{tokens / wall:.1f} tokens/s overall")
    for exc in errors[:3]:
        print(f"  error: {exc!r}")


@click.command()
@click.option("--model", default=None, help="The model [default: the default model; --tiny: a random one].")
@click.option("--exits", default="", help="Exits, as cecollm-edge takes them [default: the model's].")
@click.option("--tiny", is_flag=True, help="A small random Llama built here (seconds, nothing to download).")
@click.option("--n", type=click.IntRange(1), default=5, show_default=True, help="Prompts.")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--clients", type=click.IntRange(1), default=20, show_default=True, help="Concurrent clients.")
@click.option("--queue", type=click.IntRange(0), default=16, show_default=True, help="The server's --queue.")
def main(model, exits, tiny, n, max_tokens, clients, queue) -> None:
    import openai
    import torch

    from cecollm.broker.launch import BrokerProcess
    from cecollm.cliutil import setup_logging
    from cecollm.edge.client import EdgeClient, EdgeConfig
    from cecollm.edge.heads import edge_setup
    from cecollm.prompting import encode_prompt
    from cecollm.runtime import free_ports
    from cecollm.spec import ModelSpec

    setup_logging()
    for noisy in ("httpx", "httpx2", "openai"):  # a log line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="bench-server-"))
    if tiny:
        model, exits = _tiny_model(workdir / "tiny"), exits or "3,6"
    spec = ModelSpec.from_options(model, exits)
    prompts = (DEFAULT_PROMPTS * n)[:n]
    loaded = spec.load()
    split, heads = edge_setup(spec, loaded)
    tok = loaded.tokenizer
    spec_options = spec.options()
    with BrokerProcess(spec.model, workers=1, extra=spec_options[2:], log_path=workdir / "broker.log") as broker:
        (port,) = free_ports(1)
        server = _start_server(broker, spec_options, port, max_tokens, queue)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            config = EdgeConfig(1, broker.request_address, broker.upload_address, threshold=1.0,
                                max_new_tokens=max_tokens, keys=broker.device_keys)
            with EdgeClient(loaded.model, loaded.identity, split, heads, config) as client:
                _direct(client, tok, encode_prompt(tok, prompts[0]))  # warm-up, both ways
                _served(api, "bench", prompts[0], max_tokens)
                before = _server_ttft(url)
                rows, expected = [], {}
                for prompt in prompts:
                    direct = _direct(client, tok, encode_prompt(tok, prompt))
                    served = _served(api, "bench", prompt, max_tokens)
                    expected[prompt] = direct[3]
                    rows.append((direct, served, direct[3] == served[3]))
                after = _server_ttft(url)
            _report(rows)
            print(f"the server's own TTFT (arrival to first token, /metrics): mean "
                  f"{1000 * (after[0] - before[0]) / (after[1] - before[1]):.1f} ms")
            _concurrent(url, prompts, expected, clients, max_tokens)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


def _report(rows) -> None:
    print(f"{'':>4} {'direct TTFT ms':>15} {'server TTFT ms':>15} {'direct tok/s':>13} {'server tok/s':>13} same text")
    for i, (d, s, same) in enumerate(rows):
        print(f"{i:>4} {1000 * d[0]:>15.1f} {1000 * s[0]:>15.1f} {d[1] / d[2]:>13.1f} {s[1] / s[2]:>13.1f} {same}")
    ttft_d, ttft_s = statistics.median(r[0][0] for r in rows), statistics.median(r[1][0] for r in rows)
    rate_d = sum(r[0][1] for r in rows) / sum(r[0][2] for r in rows)
    rate_s = sum(r[1][1] for r in rows) / sum(r[1][2] for r in rows)
    print(f"median TTFT: direct {1000 * ttft_d:.1f} ms, server {1000 * ttft_s:.1f} ms, ratio {ttft_s / ttft_d:.3f}; "
          f"tokens/s: direct {rate_d:.1f}, server {rate_s:.1f}, ratio {rate_s / rate_d:.3f}; "
          f"identical texts {sum(r[2] for r in rows)}/{len(rows)}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
