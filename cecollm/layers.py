"""Run decoder layers of a Llama-family model (transformers' or cecollm.llama's) against our own KV cache.

Every number matches what transformers' Llama computes: the same operations on the same values
in the same order (checked bit for bit in tests/test_layers.py), in float32 and float16; in
bfloat16 for passes of up to 32 rows that start a sequence (see the bfloat16 paragraph below). What
differs is only how many operations a step dispatches, because a decode step of a small model is ~20%
Python and dispatch:

- the rotary table is built once for all positions (elementwise, the same values transformers
  computes per call) and a step takes rows of it;
- the rotary's rotate_half(q) * sin is roll(q) * sin with its first half negated (computed once a
  step): the same products, as negation is exact, without slices, a negation and a cat per tensor;
- the RMS norms, projections, rotary and attention call torch functions directly, not modules;
- transformers' SDPA dispatch is reproduced here (GQA inside SDPA, or repeated keys when there
  is a mask), so this module does not import transformers (a fast start).

In bfloat16 the matrix products run on weights packed once for oneDNN (packing.py: F.linear's bits
for up to 32 rows, a step 1.33x faster), with q/k/v and gate/up as one product each, and in pieces
of 32 rows beyond, so each row gets one row's bits where F.linear would round otherwise; rows that
continue a sequence attend row by row (attend()). So however a sequence's rows are grouped (a
prompt, a verification of drafts, a batch of devices) they get the bits of decoding one at a time.
In float32 the fusion was bit-equal but no faster and cost a 280 MB copy at every start, so float32
keeps F.linear.

Only the KV bookkeeping is ours, because a split model needs per-layer lengths and late filling of
positions that exited early.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cecollm.packing import fused_rows, linear_rows

_INITIAL_ROPE_POSITIONS = 1024  # the rotary table grows by doubling past this
# Rows continuing a sequence up to which bfloat16 attention runs row by row (as decoding does): a verification's
# few rows. Longer continuations (a chat's next turn) take one masked pass, whose cost does not grow per row.
ROWWISE_ROWS = 32


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
        self.n_heads = self.config.num_attention_heads
        self.hidden_size = self.config.hidden_size
        self.groups = self.n_heads // self.n_kv_heads
        self.scaling = attn.scaling
        self.layer_calls = 0  # layers run so far, counted per call (tests assert on it)
        self._silu = getattr(self.config, "hidden_act", "silu") == "silu"
        self._signed = (None, None)  # (sin of a step's rows, its signed form for the rolled rotary)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> (cos, sin) [1, P, hd]
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        self._static_rope = "dynamic" not in rope_type and rope_type != "longrope"  # else inv_freq changes with length

    # -- rotary ---------------------------------------------------------------------------------

    def _table(self, end: int, dtype: torch.dtype):
        """cos, sin [1, P, hd] for positions [0, P), P >= end, in `dtype` (transformers' values)."""
        table = self._tables.get(dtype)
        if table is None or table[0].shape[1] < end:
            size = _INITIAL_ROPE_POSITIONS
            while size < end:
                size *= 2
            # As LlamaRotaryEmbedding.forward, elementwise, so a row is what a call for that position gives.
            positions = torch.arange(size).unsqueeze(0)  # [1, P]
            freqs = positions[..., None].float() * self.rotary.inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            scaling = self.rotary.attention_scaling
            table = ((emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype))
            self._tables[dtype] = table  # one assignment: a concurrent reader sees the old or the new table
        return table

    def rope(self, start: int, end: int, like: torch.Tensor):
        """cos, sin for positions [start, end), each [1, end-start, head_dim]."""
        if not self._static_rope:
            return self.rotary(like, torch.arange(start, end).unsqueeze(0))
        cos, sin = self._table(end, like.dtype)
        return cos[:, start:end], sin[:, start:end]

    def rope_at(self, positions: torch.Tensor, like: torch.Tensor):
        """cos, sin for the positions [1, T] (any order: a batch of several sequences' rows), each [1, T, head_dim]."""
        if not self._static_rope:
            return self.rotary(like, positions)
        cos, sin = self._table(int(positions.max()) + 1 if positions.numel() else 0, like.dtype)
        return cos[0, positions[0]].unsqueeze(0), sin[0, positions[0]].unsqueeze(0)

    # -- layers ---------------------------------------------------------------------------------

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
        t, hd = x.shape[1], self.head_dim
        h = _rms_norm(x, layer.input_layernorm)
        qkv = fused_rows(h, attn, "packed_qkv") or (_linear(h, attn.q_proj), _linear(h, attn.k_proj),
                                                     _linear(h, attn.v_proj))
        # [1, T, heads*hd] -> [1, T, heads, hd] -> [1, heads, T, hd]
        q, k, v = (part.view(1, t, -1, hd).transpose(1, 2) for part in qkv)
        cos, sin = rope
        signed = self._signed  # one read: another thread may replace it
        if signed[0] is not sin:  # the first layer of a step: the rows' sin with the first half negated
            signed = (sin, _negate_first_half(sin).unsqueeze(1))
            self._signed = signed
        cos = cos.unsqueeze(1)
        # q * cos + rotate_half(q) * sin, where rotate_half(q) * sin = [-q2 * s1, q1 * s2] = roll(q) * [-s1, s2]
        # bit for bit (negation is exact): a roll and one multiply instead of two slices, a negation and a cat.
        half = self.head_dim // 2
        q = q * cos + q.roll(half, dims=-1) * signed[1]
        k = k * cos + k.roll(half, dims=-1) * signed[1]
        return q, k, v

    def attend(self, index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """One sequence's attention: queries q [1, heads, T, hd] at positions [start, start+T) over its keys and
        values [1, kv heads, start+T, hd]; the output [1, T, heads*hd] (before o_proj)."""
        t = q.shape[2]
        if 1 < t <= ROWWISE_ROWS and start > 0 and q.dtype == torch.bfloat16:
            # bfloat16 rows continuing a sequence (drafts to verify): each row as a decode step computes it, one
            # query over the keys up to its position, so verified rows get the bits of rows decoded one at a
            # time, as the packed products give them (the masked several-row kernel rounds otherwise). It costs
            # ~0.7 ms a layer for 32 rows, little for the few rows of a verification. Elsewhere the products
            # round rows apart anyway (float32's small-row kernels), so one masked pass.
            rows = [_sdpa(q[:, :, i:i + 1].contiguous(), keys[:, :, :start + i + 1], values[:, :, :start + i + 1],
                          None, self.scaling, self.groups) for i in range(t)]  # each [1, 1, heads, hd]
            return torch.cat(rows, dim=1).reshape(1, t, -1)  # [1, T, heads, hd] -> [1, T, heads*hd]
        mask = None
        if t > 1 and start > 0:
            # Rows see every cached position and the rows before them: [T, start+T], True = attend.
            mask = torch.ones(t, start + t, dtype=torch.bool).tril(diagonal=start)
        out = _sdpa(q, keys, values, mask, self.scaling, self.groups)
        return out.reshape(1, t, -1)  # [1, T, heads, hd] -> [1, T, heads*hd]

    def finish(self, index: int, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of layer `index`: output projection, residual, MLP. Row-wise, as project()."""
        layer = self.layers[index]
        x = x + _linear(attended.contiguous(), layer.self_attn.o_proj)
        h = _rms_norm(x, layer.post_attention_layernorm)
        mlp = layer.mlp
        if self._silu:  # LlamaMLP: down(act(gate(h)) * up(h))
            gate, up = fused_rows(h, mlp, "packed_gate_up") or (_linear(h, mlp.gate_proj), _linear(h, mlp.up_proj))
            return x + _linear(F.silu(gate) * up, mlp.down_proj)
        return x + mlp(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over hidden [1, T, hidden] -> [1, T, vocab] (float32)."""
        return self.lm_head(self.norm(hidden)).float()


def _linear(x: torch.Tensor, linear) -> torch.Tensor:
    """nn.Linear.forward without the module call (on its packed weight where packing.pack_linears gave one)."""
    return linear_rows(linear, x)


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """LlamaRMSNorm.forward: weight * (x in float32 * rsqrt(mean(x^2) + eps)) cast back."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)  # the same values, one op
    if x.dtype == norm.weight.dtype:  # normalized in float32 (one op), cast back, then the weight: the same values
        return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.variance_epsilon).to(x.dtype)
    return norm(x)


def _negate_first_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., :half], x[..., half:]), dim=-1)


def _sdpa(q, keys, values, mask, scaling: float, groups: int) -> torch.Tensor:
    """transformers' sdpa_attention_forward on CPU (Llama, no dropout): [1, T, heads, hd], contiguous."""
    t = q.shape[2]
    kwargs = {}
    if groups > 1:
        if mask is None and keys.shape[-1] == values.shape[-1] <= 256:
            kwargs["enable_gqa"] = True
        elif t == 1:  # one query row: the heads of a kv head become its rows
            q = q.reshape(q.shape[0], q.shape[1] // groups, groups, q.shape[-1])
        else:
            keys = _repeat_kv(keys, groups)
            values = _repeat_kv(values, groups)
    is_causal = t > 1 and mask is None
    if is_causal and keys.shape[2] > t:
        keys, values = keys[:, :, :t], values[:, :, :t]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=scaling,
                                         is_causal=is_causal, **kwargs)
    out = out.reshape(out.shape[0], -1, t, values.shape[-1])
    return out.transpose(1, 2).contiguous()


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def top1(logits: torch.Tensor) -> tuple[int, float]:
    """Greedy token (argmax of the logits, as transformers' greedy search) and its probability."""
    logits = logits.float()
    token = int(torch.argmax(logits))
    conf = float(torch.softmax(logits, dim=-1)[token])
    return token, conf
