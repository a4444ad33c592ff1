"""bfloat16 products on packed weights: F.linear's bits, in each module and through a decoding runner."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cecollm import packing
from cecollm.cache.kv import KVCache
from cecollm.layers import DecoderRunner, top1
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.skipif(not packing.supported(torch.bfloat16), reason="no oneDNN bfloat16 kernels here")


def bf16_model(name: str):
    return make_tiny_model(name).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_packed_modules_give_f_linear_bits(name):
    model = bf16_model(name)
    plain = copy.deepcopy(model)
    n_layers = model.config.num_hidden_layers
    # q/k/v and gate/up fused per layer, o and down alone, the LM head alone
    assert packing.pack_linears(model) == 4 * n_layers + 1
    layer = model.model.layers[0]
    assert "packed_qkv" in layer.self_attn.__dict__ and "packed_gate_up" in layer.mlp.__dict__
    assert "packed" not in layer.self_attn.q_proj.__dict__  # a fused part keeps F.linear for many rows
    assert packing.pack_linears(model) == 0, "packing twice packs nothing more"
    hidden = model.config.hidden_size
    with torch.inference_mode():
        for rows in (1, 5, packing.MAX_PACKED_ROWS, packing.MAX_PACKED_ROWS + 9):
            x = torch.randn(1, rows, hidden).to(torch.bfloat16)
            assert torch.equal(model.lm_head(x), plain.lm_head(x)), rows
            qkv = packing.fused_rows(x, layer.self_attn, "packed_qkv")
            if rows > packing.MAX_PACKED_ROWS:
                assert qkv is None
                continue
            attn = plain.model.layers[0].self_attn
            for got, linear in zip(qkv, (attn.q_proj, attn.k_proj, attn.v_proj)):
                assert torch.equal(got, F.linear(x, linear.weight)), rows
            gate, up = packing.fused_rows(x, layer.mlp, "packed_gate_up")
            assert torch.equal(gate, F.linear(x, plain.model.layers[0].mlp.gate_proj.weight))
            assert torch.equal(up, F.linear(x, plain.model.layers[0].mlp.up_proj.weight))


def decode(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits through a DecoderRunner: a prompt pass, then one row a step."""
    runner = DecoderRunner(model)
    cache = KVCache.for_runner(runner, 0, runner.n_layers)
    tokens, logits = [], []
    ids = prompt
    with torch.inference_mode():
        for _ in range(steps):
            start = cache.lengths[0]
            x = runner.embed(torch.tensor([ids]))
            rope = runner.rope(start, start + len(ids), x)
            for i in range(runner.n_layers):
                x = runner.run_layer(i, x, start, cache, rope)
            out = runner.logits(x[:, -1:])[0, -1]
            logits.append(out)
            ids = [top1(out)[0]]
            tokens.append(ids[0])
    return tokens, logits


@pytest.mark.parametrize("name", ["mha", "gqa"])
@pytest.mark.parametrize("prompt_len", [7, 45])  # a prompt pass on packed weights, and one past MAX_PACKED_ROWS
def test_packed_runner_decodes_bit_for_bit(name, prompt_len):
    model = bf16_model(name)
    plain = copy.deepcopy(model)
    assert packing.pack_linears(model) > 0
    prompt = [(13 * i + 5) % model.config.vocab_size for i in range(prompt_len)]
    got_tokens, got_logits = decode(model, prompt, 12)
    want_tokens, want_logits = decode(plain, prompt, 12)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits):
        assert torch.equal(got, want)


def test_other_dtypes_are_not_packed():
    for dtype in (torch.float32, torch.float16):
        model = make_tiny_model("gqa").to(dtype)
        assert packing.pack_linears(model) == 0
        assert not any("packed" in m.__dict__ for m in model.modules())


def test_a_disagreeing_kernel_packs_nothing(monkeypatch):
    model = bf16_model("mha")
    monkeypatch.setattr(packing, "_agrees", lambda parts: False)
    assert packing.pack_linears(model) == 0
    assert not any(k.startswith("packed") for m in model.modules() for k in m.__dict__)


def test_gradients_go_through_f_linear():
    model = bf16_model("mha")
    packing.pack_linears(model)
    x = torch.randn(1, 2, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    model.lm_head(x).float().sum().backward()  # the packed product has no backward; F.linear has
    assert x.grad is not None and x.grad.shape == x.shape
