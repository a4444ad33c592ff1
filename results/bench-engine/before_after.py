"""Tokens/s of `cecollm generate --mode cloud` in-process with the DecoderRunner of commit BEFORE against this
checkout's, interleaved in one run (each prompt's best of 3), to show what the per-token work bought.
Timed in CPU time of the process (one thread), as the machine is shared: wall time would count other loads.

    PYTHONPATH=. python results/bench-engine/before_after.py a97cf26 --threads 1
"""
import subprocess
import sys
import time
import types

import torch

from cecollm.config import GenerationConfig
from cecollm.edge.heads import edge_setup
from cecollm.engine import SplitEngine
from cecollm.prompting import encode_prompt, read_prompt_file
from cecollm.spec import ModelSpec

before = sys.argv[1]
threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
torch.set_num_threads(threads)
old = types.ModuleType("old_layers")
exec(subprocess.check_output(["git", "show", f"{before}:cecollm/layers.py"], text=True), old.__dict__)
spec = ModelSpec()
loaded = spec.load()
split, heads = edge_setup(spec, loaded)
engine = SplitEngine(loaded.model, split, heads)
runners = {"before": old.DecoderRunner(loaded.model), "after": engine.runner}
config = GenerationConfig(mode="cloud", max_new_tokens=64)
totals = {k: [0.0, 0] for k in runners}
outputs = {k: [] for k in runners}
with torch.inference_mode():
    for prompt in read_prompt_file("../shared/data/alpaca.jsonl")[:5]:
        ids = encode_prompt(loaded.tokenizer, prompt)
        best = {k: float("inf") for k in runners}
        last = {}
        for _ in range(3):
            for k, runner in runners.items():
                engine.runner = runner
                t0 = time.process_time()
                last[k] = engine.generate(ids, config).token_ids
                best[k] = min(best[k], time.process_time() - t0)
        for k in runners:
            totals[k][0] += best[k]
            totals[k][1] += len(last[k])
            outputs[k].append(last[k])
rates = {k: n / s for k, (s, n) in totals.items()}
print(f"{threads} thread(s), 5 Alpaca prompts x 64 tokens: before ({before}) {rates['before']:.2f} tokens/s, after "
      f"{rates['after']:.2f} tokens/s, ratio {rates['after'] / rates['before']:.3f}; outputs equal: "
      f"{outputs['before'] == outputs['after']}")
