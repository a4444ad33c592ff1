"""A/B in one process: an exact-mode edge step (SmolLM2 bf16, exits 22,26 trained heads, threshold 0.8 with the
last exit deciding, 100 positions) with the heads' rows packed against the same heads on F.linear."""
import time

import torch

from cecollm.edge.heads import edge_setup
from cecollm.edge.partition import EdgePartition
from cecollm.layers import DecoderRunner
from cecollm.spec import ModelSpec

torch.set_num_threads(1)
spec = ModelSpec(dtype="bfloat16")
loaded = spec.load()
split, heads = edge_setup(spec, loaded)
runner = DecoderRunner(loaded.model)
L = 100
def make():
    edge = EdgePartition(runner, split, heads, 0.8, last_exit_decides=True)
    edge.step(list(range(1000, 1000 + L)))
    return edge
with torch.inference_mode():
    edge = make()
    for h in heads.heads.values():  # computes and packs the rows
        h.class_logits(torch.zeros(1, 1, 576, dtype=torch.bfloat16), runner.lm_head)
    packed = {e: h.__dict__["packed_rows"] for e, h in heads.heads.items()}
    toks = [5, 17, 300, 4000, 12, 99, 1234, 777]
    def steps():
        t0 = time.process_time()
        n0 = edge.length
        for t in toks:
            edge.step([t])
        dt = time.process_time() - t0
        edge.rollback(n0)
        return dt / len(toks) * 1000
    res = {"packed": [], "F.linear": []}
    for _round in range(12):
        for name in ("packed", "F.linear"):
            for e, h in heads.heads.items():
                h.__dict__["packed_rows"] = packed[e] if name == "packed" else None
            res[name].append(steps())
    for k, v in res.items():
        v.sort()
        print(f"{k}: edge step median {v[len(v)//2]:.2f} ms, min {v[0]:.2f} ms")
    print(f"packed / F.linear (medians): {res['packed'][6] / res['F.linear'][6]:.3f}")
