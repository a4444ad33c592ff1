"""How close a bfloat16 decode step of `cecollm generate --mode cloud --threads 1` (SmolLM2, packed weights, 100 cached
positions) is to its matrix products alone, and what those products allow: CPU time of a whole step through
DecoderRunner against the same step's packed products run by themselves (q/k/v and gate/up fused, o, down, LM head;
one row each). 1000 / (products' ms) is the most tokens/s any step on these weights could give on this core, with
every other part of the step (norms, rotary, attention, KV writes, Python) taking no time at all.
llama.cpp's decode step (llama-cpp-python, the GGUF the model came from, the same 100 cached positions and threads)
is timed in the same loop where llama-cpp-python is installed, so the bound and the peer come from one run.
Then why the rest costs what it does: one row's RMSNorm right after the LM head streamed its 56 MB of weights
through the caches, against the same norm run again at once (warm).

    CECOLLM_DTYPE=bfloat16 PYTHONPATH=. python results/bench-engine/profile_bf16.py [THREADS]

With THREADS > 1 (default 1) the times are wall time (perf_counter) instead of this process's CPU time, as the
threads' CPU times add up.
"""
import importlib.util
import sys
import time

import torch

from cecollm.cache.kv import KVCache
from cecollm.layers import DecoderRunner, _linear, _rms_norm, top1
from cecollm.loading import default_model_gguf
from cecollm.packing import fused_rows
from cecollm.spec import ModelSpec

THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(THREADS)
clock = time.process_time if THREADS == 1 else time.perf_counter
loaded = ModelSpec(dtype="bfloat16").load()
r = DecoderRunner(loaded.model)
L = 100  # positions in the cache


def bench(fn, n):
    fn()
    fn()
    best = float("inf")
    for _ in range(5):
        t0 = clock()
        for _ in range(n):
            fn()
        best = min(best, (clock() - t0) / n)
    return best * 1000


with torch.inference_mode():
    cache = KVCache.for_runner(r, 0, r.n_layers)
    x = r.embed(torch.tensor([list(range(1000, 1000 + L))]))
    rope = r.rope(0, L, x)
    for i in range(r.n_layers):
        x = r.run_layer(i, x, 0, cache, rope)

    def step():
        n = cache.lengths[0]
        y = r.embed(torch.tensor([[5]]))
        ro = r.rope(n, n + 1, y)
        for i in range(r.n_layers):
            y = r.run_layer(i, y, n, cache, ro)
        top1(r.logits(y[:, -1:])[0, -1])
        cache.truncate(n)

    h = torch.randn(1, 1, r.hidden_size, dtype=torch.bfloat16)
    hi = torch.randn(1, 1, r.layers[0].mlp.down_proj.in_features, dtype=torch.bfloat16)

    def products():
        for layer in r.layers:
            fused_rows(h, layer.self_attn, "packed_qkv")
            _linear(h, layer.self_attn.o_proj)
            fused_rows(h, layer.mlp, "packed_gate_up")
            _linear(hi, layer.mlp.down_proj)
        r.lm_head(h)

    peer_step = None
    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama

        gguf = default_model_gguf()
        llm = Llama(str(gguf), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=512, verbose=False)
        llm.eval(list(range(1000, 1000 + L)))

        def peer_step():
            llm.eval([5])  # one decode step at 100 cached positions, logits of the last row
            llm.n_tokens = L  # the next eval drops the row just added

    assert fused_rows(h, r.layers[0].self_attn, "packed_qkv") is not None, "the weights are not packed here"
    for _ in range(3):  # interleaved, so all see the same machine
        total = bench(step, 30)
        arithmetic = bench(products, 30)
        line = (f"{THREADS} thread(s): step {total:.2f} ms ({1000 / total:.1f} tokens/s) | packed products alone "
                f"{arithmetic:.2f} ms ({arithmetic / total:.0%} of the step; at most {1000 / arithmetic:.1f} tokens/s "
                "with the rest free)")
        if peer_step is not None:
            peer = bench(peer_step, 30)
            line += (f" | llama.cpp {gguf.stem.rsplit('.', 1)[-1]} step {peer:.2f} ms ({1000 / peer:.1f} tokens/s; "
                     f"the products' bound is {peer / arithmetic:.2f} of it)")
        print(line)

    norm = r.layers[0].input_layernorm
    cold, warm = [], []
    for _ in range(200):
        r.lm_head(h)
        t0 = time.perf_counter()
        _rms_norm(h, norm)
        t1 = time.perf_counter()
        _rms_norm(h, norm)
        cold.append(t1 - t0)
        warm.append(time.perf_counter() - t1)
    cold.sort()
    warm.sort()
    print(f"one row's RMSNorm: {cold[100] * 1e6:.1f} us after the LM head's product, {warm[100] * 1e6:.1f} us warm (medians)")
