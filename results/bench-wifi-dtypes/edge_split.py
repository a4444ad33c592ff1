"""An exact-mode edge step against a cloud-based step (30 layers and the LM head), in one process, interleaved:
SmolLM2 in the dtype given (bfloat16 by default), exits 22,26 with the bundled heads, 100 cached positions, one thread.

    PYTHONPATH=. python results/bench-wifi-dtypes/edge_split.py [bfloat16|float32]
"""
import sys
import time

import torch

from cecollm.cache.kv import KVCache
from cecollm.edge.heads import edge_setup
from cecollm.edge.partition import EdgePartition
from cecollm.layers import DecoderRunner, top1
from cecollm.spec import ModelSpec

torch.set_num_threads(1)
spec = ModelSpec(dtype=sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
loaded = spec.load()
split, heads = edge_setup(spec, loaded)
r = DecoderRunner(loaded.model)
L = 100
toks = [5, 17, 300, 4000, 12, 99, 1234, 777]
with torch.inference_mode():
    edges = {}
    for th in (0.8, 1.0):
        e = EdgePartition(r, split, heads, th, last_exit_decides=True)
        e.step(list(range(1000, 1000 + L)))
        edges[th] = e
    cache = KVCache.for_runner(r, 0, r.n_layers)
    x = r.embed(torch.tensor([list(range(1000, 1000 + L))]))
    rope = r.rope(0, L, x)
    for i in range(r.n_layers):
        x = r.run_layer(i, x, 0, cache, rope)
    def layers(n_layers, head):
        def f():
            n = cache.lengths[0]
            for t in toks:
                m = cache.lengths[0]
                y = r.embed(torch.tensor([[t]]))
                ro = r.rope(m, m + 1, y)
                for i in range(n_layers):
                    y = r.run_layer(i, y, m, cache, ro)
                if head:
                    top1(r.logits(y[:, -1:])[0, -1])
            cache.truncate(n)
        return f
    def edge(th):
        e = edges[th]
        def f():
            n0 = e.length
            for t in toks:
                e.step([t])
            e.rollback(n0)
        return f
    cases = {"cloud step (30 layers + LM head)": layers(30, True), "26 layers, no head": layers(26, False),
             "edge step, threshold 1.0 (head 26)": edge(1.0), "edge step, threshold 0.8 (heads 22, 26)": edge(0.8)}
    res = {k: [] for k in cases}
    for _round in range(8):
        for k, f in cases.items():
            t0 = time.process_time()
            f()
            res[k].append((time.process_time() - t0) / len(toks) * 1000)
    base = sorted(res["cloud step (30 layers + LM head)"])[4]
    for k, v in res.items():
        v.sort()
        print(f"{k}: {v[4]:.2f} ms ({v[4] / base:.2f} of the cloud step)")
