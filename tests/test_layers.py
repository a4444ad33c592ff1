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
