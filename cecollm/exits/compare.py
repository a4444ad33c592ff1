"""`cecollm exits-compare`: head architectures (or exits) side by side on cached text.

Each candidate is trained on the same training cache with the same seed and budget, then
measured teacher-forced on the evaluation caches: agreement with the final layer, the share
of tokens at or above the threshold and their accuracy, the cascade over the exits, and the
cost of one head call for one token on one thread (also in decoder layers).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from cecollm.edge.heads import NormHead
from cecollm.errors import UserError
from cecollm.exits.collect import ExitCache
from cecollm.exits.config import TrainConfig
from cecollm.exits.measure import head_ms, layer_ms, measure_heads
from cecollm.exits.train import ExitTrainer


def parse_candidate(text: str) -> tuple[str, str, dict, bool, float]:
    """'lens' | 'norm' | 'adapter:R[:V]' | 'layer', each optionally '@G' (greedy weight)
    -> (label, arch, options, train?, greedy weight)."""
    spec, _, weight = text.partition("@")
    try:
        greedy = float(weight) if weight else 0.0
    except ValueError:
        raise UserError(f"candidate {text!r}: the greedy weight after @ must be a number") from None
    return (text, *_parse_arch(spec), greedy)


def _parse_arch(text: str) -> tuple[str, dict, bool]:
    parts = text.split(":")
    try:
        if parts[0] == "lens":
            return "norm", {}, False
        if parts[0] in ("norm", "layer") and len(parts) == 1:
            return parts[0], {}, True
        if parts[0] == "adapter":
            rank = int(parts[1]) if len(parts) > 1 else 64
            vocab = int(parts[2]) if len(parts) > 2 else 0
            return "adapter", {"rank": rank, "vocab": vocab}, True
    except ValueError:
        pass
    raise UserError(f"unknown candidate {text!r}: use lens, norm, adapter:RANK[:VOCAB] or layer (+ @GREEDY_WEIGHT)")


def merge_caches(caches: list[ExitCache]) -> ExitCache:
    offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
    for c in caches:
        offsets.append(c.offsets[1:] + base)
        base += c.rows
    layers = caches[0].layers
    return ExitCache(layers, {e: torch.cat([c.hidden[e] for c in caches]) for e in layers},
                     torch.cat([c.top_idx for c in caches]), torch.cat([c.top_p for c in caches]),
                     torch.cat(offsets), torch.cat([c.train for c in caches]), torch.cat([c.answer for c in caches]))


def compare(model, exits, train_cache: ExitCache, eval_cache: ExitCache, candidates, base: TrainConfig,
            threshold: float = 0.8, cascades=()) -> list[dict]:
    """Train and measure each candidate; `cascades` are subsets of the exits measured as splits."""
    parsed = [parse_candidate(text) for text in candidates]  # all checked before any training
    if not parsed:
        raise UserError("no candidates to compare")
    torch.set_num_threads(1)
    one_layer = layer_ms(model)
    rows = []
    for label, arch, options, trained, greedy in parsed:
        t0 = time.monotonic()
        if trained:
            trainer = ExitTrainer(model, exits, train_cache, replace(base, arch=arch, arch_options=options,
                                                                           greedy_weight=greedy))
            summary = trainer.train()
            heads = trainer.heads
        else:
            heads, summary = {e: NormHead(model.model.norm).eval() for e in exits}, {}
        seconds = time.monotonic() - t0
        result = measure_heads(heads, eval_cache, model.lm_head, thresholds=(threshold, 0.9))
        result["splits"] = {",".join(map(str, sub)): measure_heads({e: heads[e] for e in sub}, eval_cache, model.lm_head,
                                                                   thresholds=(threshold, 0.9))["cascade"]
                            for sub in cascades}
        ms = head_ms(heads[exits[0]], model)
        row = {"candidate": label, "train_s": round(seconds), "steps": summary.get("steps", 0),
               "final_loss": summary.get("final_loss"), "head_ms": round(ms, 2),
               "head_layers": round(ms / one_layer, 1), "layer_ms": round(one_layer, 2),
               "vocab_coverage": summary.get("vocab_coverage"), "params": sum(p.numel() for p in heads[exits[0]].parameters()),
               "exits": result["exits"], "cascade": result["cascade"], "splits": result["splits"], "final": result["final"],
               "eval_rows": result["rows"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def format_rows(rows: list[dict], threshold: float = 0.8) -> str:
    exits = list(rows[0]["exits"])
    head = ["head"] + [f"exit {e}: agree / share@{threshold} / acc@{threshold}" for e in exits] + [
        f"cascade share / acc @{threshold}", "head ms (layers)", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["candidate"]]
        for e in exits:
            m = r["exits"][e]
            acc = m[f"accuracy@{threshold}"]
            cells.append(f"{m['agreement']:.3f} / {m[f'share@{threshold}']:.3f} / {acc if acc is None else f'{acc:.3f}'}")
        c = r["cascade"]
        acc = c[f"accuracy@{threshold}"]
        cells.append(f"{c[f'share@{threshold}']:.3f} / {acc if acc is None else f'{acc:.3f}'}")
        cells.append(f"{r['head_ms']:.2f} ({r['head_layers']:.1f})")
        cells.append(str(r["train_s"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
