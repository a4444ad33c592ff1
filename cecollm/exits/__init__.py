"""Training and evaluating early-exit heads on a frozen backbone (self-distillation).

- `data`: training text from jsonl/text files, chat-templated, with held-out Alpaca records.
- `selfgen`: the model's own greedy answers to prompts (batched), as training text.
- `collect`: one frozen forward pass caches exit hidden states and the teacher's top-k.
- `train`: the heads learn the final layer's next-token distribution from the cache.
- `measure`: teacher-forced agreement, calibration and cost per token of trained heads.
- `report`: `cecollm exits-report`, generation with SplitEngine at several thresholds.
"""
