"""cecollm.llama: our own Llama modules compute transformers' numbers, bit for bit, without importing it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from cecollm.cache.kv import KVCache
from cecollm.errors import UserError
from cecollm.layers import DecoderRunner
from cecollm.llama import load_native
from cecollm.loading import load_model, model_identity
from cecollm.spec import ModelSpec

from conftest import TINY_CONFIGS, make_tiny_model


def runner_logits(model, ids: list[int], split_at: int) -> torch.Tensor:
    """Logits of every position through the runner: a prefill of ids[:split_at], then one row at a time."""
    runner = DecoderRunner(model)
    cache = KVCache.for_runner(runner, 0, runner.n_layers)
    out, start = [], 0
    chunks = [ids[:split_at]] + [[i] for i in ids[split_at:]]
    with torch.inference_mode():
        for chunk in chunks:
            x = runner.embed(torch.tensor([chunk]))
            rope = runner.rope(start, start + len(chunk), x)
            for layer in range(runner.n_layers):
                x = runner.run_layer(layer, x, start, cache, rope)
            out.append(runner.logits(x)[0])
            start += len(chunk)
    return torch.cat(out)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_native_model_gives_transformers_logits_bit_for_bit(name, tmp_path):
    hf = make_tiny_model(name, eos=2)
    hf.save_pretrained(tmp_path)
    native = load_native(tmp_path)
    assert native is not None and type(native).__module__ == "cecollm.llama"
    assert model_identity(native) == model_identity(hf), "same config keys and weights"
    ids = torch.randint(0, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        reference = hf(torch.tensor([ids])).logits[0]  # transformers' own forward, the whole sequence at once
    ours = runner_logits(native, ids, len(ids))
    assert torch.equal(ours, reference)
    # the decode path (one row at a time over the cache) against the same runner on transformers' model
    assert torch.equal(runner_logits(native, ids, 7), runner_logits(make_tiny_model(name, eos=2), ids, 7))
    assert native.generation_config.eos_token_id == 2 and native.dtype == torch.float32


def test_mapped_weights_give_the_same_numbers(tmp_path):
    make_tiny_model("gqa").save_pretrained(tmp_path)
    ids = list(range(20))
    assert torch.equal(runner_logits(load_native(tmp_path, mapped=True), ids, 5), runner_logits(load_native(tmp_path), ids, 5))


def test_other_architectures_fall_back_to_transformers(tmp_path):
    model = make_tiny_model("mha")
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model.save_pretrained(tmp_path)
    assert load_native(tmp_path) is None
    loaded = ModelSpec(str(tmp_path)).load()
    assert type(loaded.model).__module__.startswith("transformers")


def test_missing_or_damaged_weights_are_user_errors(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare)
    with pytest.raises(UserError, match="cannot load the weights"):
        ModelSpec(str(bare)).load()
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    for mapped in (False, True):
        with pytest.raises(UserError, match="cannot load the weights"):
            ModelSpec(str(damaged)).load(mapped=mapped)


def test_spec_load_matches_load_model(tiny_model_dir):
    fast, reference = ModelSpec(str(tiny_model_dir)).load(), load_model(str(tiny_model_dir))
    assert fast.identity == reference.identity
    assert fast.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story"}], add_generation_prompt=True) == \
        list(reference.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story"}],
                                                     add_generation_prompt=True, tokenize=True)["input_ids"])


def test_a_run_does_not_import_transformers(tiny_model_dir):
    """The fast start: loading, encoding, generating and decoding leave transformers, dynamo and the other
    commands (linkem) unimported."""
    code = f"""
import sys
from cecollm.config import GenerationConfig
from cecollm.edge.heads import edge_setup
from cecollm.engine import SplitEngine
from cecollm.prompting import encode_prompt
from cecollm.spec import ModelSpec
spec = ModelSpec({str(tiny_model_dir)!r})
loaded = spec.load()
split, heads = edge_setup(spec, loaded)
result = SplitEngine(loaded.model, split, heads).generate(encode_prompt(loaded.tokenizer, "Tell me"), GenerationConfig(
    mode="collab", max_new_tokens=5))
loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True)
ModelSpec({str(tiny_model_dir)!r}).load(mapped=True)
import cecollm.cli
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers" or m.startswith("torch._dynamo")
             or m.startswith("cecollm.linkem")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
