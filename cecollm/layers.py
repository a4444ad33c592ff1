"""Run decoder layers of a transformers Llama-family model against our own KV cache.

We reuse the model's own modules (norms, projections, MLP, rotary table, and transformers'
SDPA attention function) so every number matches what transformers computes; only the KV
bookkeeping is ours, because a split model needs per-layer lengths and late filling of
positions that exited early.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class DecoderRunner:
    """Runs layers of one model; holds no per-sequence state (that lives in KVCache)."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = model.model
        self.layers = inner.layers
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.config = model.config
        self.n_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_kv_heads = self.config.num_key_value_heads
        self.hidden_size = self.config.hidden_size
        self._attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self.layer_calls = 0  # layers run so far, counted per call (tests assert on it)

    def rope(self, start: int, end: int, like: torch.Tensor):
        """cos, sin for positions [start, end), each [1, end-start, head_dim]."""
        positions = torch.arange(start, end).unsqueeze(0)  # [1, T]
        return self.rotary(like, positions)

    def rope_at(self, positions: torch.Tensor, like: torch.Tensor):
        """cos, sin for the positions [1, T] (any order: a batch of several sequences' rows), each [1, T, head_dim]."""
        return self.rotary(like, positions)

    def run_layer(self, index: int, x: torch.Tensor, start: int, cache, rope) -> torch.Tensor:
        """Run layer `index` on rows x [1, T, hidden] at positions [start, start+T).

        `rope` is (cos, sin) for exactly those positions. `cache` (a cache.KVCache) must hold
        [0, start) at this layer; afterwards it holds [0, start+T).
        """
        q, k, v = self.project(index, x, rope)
        keys, values = cache.append(index, start, k, v)
        return self.finish(index, x, self.attend(index, q, keys, values, start))

    def project(self, index: int, x: torch.Tensor, rope):
        """Layer `index`'s rotated queries, keys and values of rows x [1, T, hidden]: q [1, heads, T, hd],
        k and v [1, kv heads, T, hd]. Row-wise: rows of several sequences may share one call."""
        self.layer_calls += 1
        layer = self.layers[index]
        attn = layer.self_attn
        t = x.shape[1]
        h = layer.input_layernorm(x)
        # [1, T, heads*hd] -> [1, T, heads, hd] -> [1, heads, T, hd]
        q = attn.q_proj(h).view(1, t, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, t, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = _apply_rotary(q, k, cos, sin)
        return q, k, v

    def attend(self, index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """One sequence's attention: queries q [1, heads, T, hd] at positions [start, start+T) over its keys and
        values [1, kv heads, start+T, hd]; the output [1, T, heads*hd] (before o_proj)."""
        attn = self.layers[index].self_attn
        t = q.shape[2]
        mask = None
        if t > 1 and start > 0:
            # Rows see every cached position and the rows before them: [T, start+T], True = attend.
            mask = torch.ones(t, start + t, dtype=torch.bool).tril(diagonal=start)
        out, _ = self._attention(attn, q, keys, values, mask, dropout=0.0, scaling=attn.scaling)
        return out.reshape(1, t, -1)  # [1, T, heads, hd] -> [1, T, heads*hd]

    def finish(self, index: int, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of layer `index`: output projection, residual, MLP. Row-wise, as project()."""
        layer = self.layers[index]
        x = x + layer.self_attn.o_proj(attended.contiguous())
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over hidden [1, T, hidden] -> [1, T, vocab] (float32)."""
        return self.lm_head(self.norm(hidden)).float()


def _apply_rotary(q, k, cos, sin):
    """Rotary embedding exactly as transformers' Llama applies it (cos/sin unsqueezed at dim 1)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def top1(logits: torch.Tensor) -> tuple[int, float]:
    """Greedy token (argmax of the logits, as transformers' greedy search) and its probability."""
    logits = logits.float()
    token = int(torch.argmax(logits))
    conf = float(torch.softmax(logits, dim=-1)[token])
    return token, conf
