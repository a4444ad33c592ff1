"""layers.DecoderRunner: what it does to dispatch less per token gives transformers' numbers exactly."""

from __future__ import annotations

import torch

from cecollm.layers import DecoderRunner

from conftest import make_tiny_model


def test_rope_rows_are_what_the_rotary_module_computes():
    model = make_tiny_model("gqa")
    runner = DecoderRunner(model)
    like = torch.zeros(1, 1, runner.hidden_size)
    for start, end in [(0, 1), (0, 37), (5, 6), (1000, 1030), (3000, 3001)]:  # past the first table: it grows
        expected = model.model.rotary_emb(like, torch.arange(start, end).unsqueeze(0))
        got = runner.rope(start, end, like)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), (start, end)
    positions = torch.tensor([[9, 2, 2, 700, 0]])  # any order, repeats: rows of several sequences
    assert all(torch.equal(g, e) for g, e in zip(runner.rope_at(positions, like), model.model.rotary_emb(like, positions)))


def test_a_layer_equals_transformers_decoder_layer_bit_for_bit():
    """project/attend/finish over a fresh cache is the transformers layer's forward on the same rows."""
    model = make_tiny_model("gqa")
    runner = DecoderRunner(model)
    x = torch.randn(1, 9, runner.hidden_size, generator=torch.Generator().manual_seed(3))
    rope = runner.rope(0, 9, x)
    with torch.inference_mode():
        for index in (0, 5):
            q, k, v = runner.project(index, x, rope)
            ours = runner.finish(index, x, runner.attend(index, q, k, v, 0))
            theirs = model.model.layers[index](x, attention_mask=None, position_embeddings=rope)
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
            assert torch.equal(ours, theirs)


def test_fused_projections_are_views_and_replaced_weights_are_noticed():
    model = make_tiny_model("mha")
    attn = model.model.layers[2].self_attn
    before = [attn.q_proj.weight.clone(), attn.k_proj.weight.clone(), attn.v_proj.weight.clone()]
    runner = DecoderRunner(model)
    fused = runner._fused[2]
    assert attn.q_proj.weight.data_ptr() == fused.qkv.data_ptr(), "the module weights are views: no second copy"
    assert all(torch.equal(a, b) for a, b in zip(before, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    again = DecoderRunner(model)
    assert again._fused[2].qkv.data_ptr() == fused.qkv.data_ptr(), "a second runner finds the fusion made"
    x = torch.randn(1, 3, runner.hidden_size)
    rope = runner.rope(0, 3, x)
    q_fused = runner.project(2, x, rope)[0]
    with torch.no_grad():
        attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight * 2)  # replaced, as model.to(dtype) does
    assert not fused.current(attn.q_proj.weight)
    assert not torch.equal(runner.project(2, x, rope)[0], q_fused), "the replaced weight is used, not the stale fusion"


def test_unfused_runner_gives_the_same_numbers():
    model = make_tiny_model("gqa")
    x = torch.randn(1, 4, model.config.hidden_size)
    plain = DecoderRunner(model, fuse=False)
    rope = plain.rope(0, 4, x)
    q, k, v = plain.project(1, x, rope)
    expected = plain.finish(1, x, plain.attend(1, q, k, v, 0))
    fused = DecoderRunner(model)
    q, k, v = fused.project(1, x, rope)
    assert torch.equal(fused.finish(1, x, fused.attend(1, q, k, v, 0)), expected)
