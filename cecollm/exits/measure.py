"""Teacher-forced measurements of exit heads on a cache, and their cost per token.

For every exit: agreement of the head's top-1 with the final layer's, and calibration at a
threshold (the share of rows whose top-1 probability reaches it, and how often those agree).
For the exits together: the cascade the edge runs (first exit that is confident decides).
"""

from __future__ import annotations

import statistics
import time

import torch

from cecollm.cache.kv import KVCache
from cecollm.edge.heads import ExitHead
from cecollm.exits.collect import ExitCache
from cecollm.layers import DecoderRunner


@torch.inference_mode()
def head_predictions(head: ExitHead, hidden: torch.Tensor, cache: ExitCache, lm_head) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [rows], confidence [rows]) of `head` on every answer row, as top1() decides them."""
    tokens, confs = [], []
    for a, b in cache.sequences():
        mask = cache.answer[a:b]
        if not mask.any():
            continue
        logits = head.class_logits(hidden[a:b].float().unsqueeze(0), lm_head)[0][mask].float()  # [n, classes]
        probs = torch.softmax(logits, dim=-1)
        vocab = getattr(head, "vocab", 0)
        if vocab:
            conf, best = probs[:, :-1].max(-1)
            tok = head.token_ids[best]
        else:
            conf, tok = probs.max(-1)
        tokens.append(tok)
        confs.append(conf)
    return torch.cat(tokens), torch.cat(confs)


def measure_heads(heads: dict[int, ExitHead], cache: ExitCache, lm_head, thresholds=(0.8, 0.9)) -> dict:
    """Per-exit agreement and calibration on the answer rows, and the cascade over the exits in order."""
    teacher = cache.top_idx[cache.answer, 0]
    final_conf = cache.top_p[cache.answer, 0]
    out = {"rows": int(teacher.numel()), "exits": {}, "cascade": {},
           # the final layer's own confidence: how often the full model is this sure
           "final": {f"share@{t}": round(float((final_conf >= t).float().mean()), 4) for t in thresholds}}
    preds = {}
    for e in sorted(heads):
        tok, conf = head_predictions(heads[e], cache.hidden[e], cache, lm_head)
        preds[e] = (tok, conf)
        agree = tok == teacher
        row = {"agreement": round(float(agree.float().mean()), 4)}
        for t in thresholds:
            sure = conf >= t
            row[f"share@{t}"] = round(float(sure.float().mean()), 4)
            row[f"accuracy@{t}"] = round(float(agree[sure].float().mean()), 4) if sure.any() else None
        out["exits"][e] = row
    for t in thresholds:
        decided = torch.zeros_like(teacher, dtype=torch.bool)
        right = torch.zeros_like(decided)
        for e in sorted(heads):
            tok, conf = preds[e]
            now = ~decided & (conf >= t)
            right |= now & (tok == teacher)
            decided |= now
        out["cascade"][f"share@{t}"] = round(float(decided.float().mean()), 4)
        out["cascade"][f"accuracy@{t}"] = round(float(right[decided].float().mean()), 4) if decided.any() else None
    return out


@torch.inference_mode()
def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


@torch.inference_mode()
def layer_ms(model, context: int = 64, repeats: int = 50) -> float:
    """Milliseconds of one decoder layer for one new token after `context` cached positions."""
    runner = DecoderRunner(model)
    cache = KVCache.for_runner(runner, 0, 1, capacity=context + repeats + 8)
    x = torch.randn(1, context, runner.hidden_size)
    runner.run_layer(0, x, 0, cache, runner.rope(0, context, x))
    state = {"pos": context}
    one = torch.randn(1, 1, runner.hidden_size)

    def step():
        p = state["pos"]
        runner.run_layer(0, one, p, cache, runner.rope(p, p + 1, one))
        state["pos"] = p + 1

    return _median_ms(step, repeats)


@torch.inference_mode()
def head_ms(head: ExitHead, model, repeats: int = 50) -> float | None:
    """Milliseconds of head.top1 for one row (None when the head cannot run on the edge)."""
    if not head.positionwise:
        # Teacher-forced stand-in: one layer's cost plus norm and LM head, for one row.
        x = torch.randn(1, 1, model.config.hidden_size)
        return _median_ms(lambda: head(x, model.lm_head), repeats)
    x = torch.randn(1, 1, model.config.hidden_size)
    return _median_ms(lambda: head.top1(x, model.lm_head), repeats)
