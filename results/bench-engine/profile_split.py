"""Where a decode step of `cecollm generate --mode cloud --threads 1` (SmolLM2, float32, 100 cached positions) spends its
time: CPU time of its parts run alone, against a whole step through DecoderRunner. Run with PYTHONPATH at a tree.

    PYTHONPATH=. python results/bench-engine/profile_split.py
"""
import time, torch, torch.nn.functional as F
from cecollm.spec import ModelSpec
from cecollm.layers import DecoderRunner, top1
from cecollm.cache.kv import KVCache
torch.set_num_threads(1)
loaded = ModelSpec().load()
r = DecoderRunner(loaded.model)
L = 100  # positions in the cache
def bench(fn, n=200):
    fn(); fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n): fn()
        best = min(best, (time.process_time() - t0) / n)
    return best * 1000
with torch.inference_mode():
    x = torch.randn(1, 1, r.hidden_size)
    lay = r.layers[0]; a = lay.self_attn; m = lay.mlp
    ws = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight]
    xi = torch.randn(1, 1, 1536)
    def mats():
        for lay in r.layers:
            a = lay.self_attn; m = lay.mlp
            for w in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight): F.linear(x, w)
            F.linear(x, m.gate_proj.weight); F.linear(x, m.up_proj.weight); F.linear(xi, m.down_proj.weight)
    mm = bench(mats, 20)
    head = bench(lambda: F.linear(x, r.lm_head.weight), 50)
    q = torch.randn(1, 9, 1, 64); k = torch.randn(1, 3, L, 64); v = torch.randn(1, 3, L, 64)
    att = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True)) * r.n_layers
    logits = torch.randn(49152)
    samp = bench(lambda: top1(logits), 100)
    rope = bench(lambda: r.rope(L, L + 1, x))
    # a whole step through the runner
    cache = KVCache.for_runner(r, 0, r.n_layers)
    ids = list(range(1000, 1000 + L))
    xx = r.embed(torch.tensor([ids])); rp = r.rope(0, L, xx)
    for i in range(r.n_layers): xx = r.run_layer(i, xx, 0, cache, rp)
    def step():
        n = cache.lengths[0]
        y = r.embed(torch.tensor([[5]])); ro = r.rope(n, n + 1, y)
        for i in range(r.n_layers): y = r.run_layer(i, y, n, cache, ro)
        top1(r.logits(y[:, -1:])[0, -1])
        cache.truncate(n)
    total = bench(step, 30)
    # the layers alone (no head, no sampling) vs their isolated arithmetic
    def layers_only():
        n = cache.lengths[0]
        y = r.embed(torch.tensor([[5]])); ro = r.rope(n, n + 1, y)
        for i in range(r.n_layers): y = r.run_layer(i, y, n, cache, ro)
        cache.truncate(n)
    lay_t = bench(layers_only, 30)
    print(f"step {total:.2f} ms | layer matmuls {mm:.2f} | attention (SDPA, {L} keys) {att:.2f} | LM head matmul {head:.2f} "
          f"| top1 (argmax+softmax) {samp:.2f} | rope per step {rope:.3f} | final norm+rest {total-lay_t-head-samp:.2f} "
          f"| rest of layers (norms, rope apply, kv copy, python) {lay_t-mm-att:.2f}")
