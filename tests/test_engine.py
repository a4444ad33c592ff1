"""The split engine against the unsplit transformers model: token ids, KV entries, layer counts."""

from __future__ import annotations

import pytest
import torch

from cecollm.cloud.partition import CloudPartition
from cecollm.config import GenerationConfig
from cecollm.edge.heads import HeadSet, NormHead
from cecollm.edge.partition import EdgePartition
from cecollm.engine import SplitEngine
from cecollm.errors import UserError
from cecollm.layers import DecoderRunner
from cecollm.split import Split

from conftest import assert_greedy_equal, hf_greedy, make_tiny_model


class ConfidentHead(NormHead):
    """The logit lens with sharpened logits, so that exits really fire on a random model."""

    def __init__(self, final_norm, scale: float) -> None:
        super().__init__(final_norm)
        self.scale = scale

    def forward(self, hidden, lm_head):
        return super().forward(hidden, lm_head) * self.scale


def confident_heads(model, exits, scale=10.0) -> HeadSet:
    return HeadSet(tuple(exits), {e: ConfidentHead(model.model.norm, scale) for e in exits})


def random_prompt(model, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist()


def run_split(edge, cloud, ids, steps, after_step=None):
    """Drive an edge and a cloud partition by hand for `steps` tokens (appended to `ids`), then one
    last step with exits off, which carries every early-exited position through all the layers.
    Returns the set of deciders seen (exit layer counts, None for the cloud)."""
    inputs, deciders = list(ids), set()
    for _ in range(steps):
        step = edge.step(inputs)
        if after_step:
            after_step()
        for up in step.uploads:
            cloud.receive(up.start, up.hidden)
        token = cloud.decide(step.position)[0] if step.token is None else step.token
        deciders.add(step.exit)
        ids.append(token)
        inputs = [token]
    edge.threshold = 1.0
    step = edge.step(inputs)
    for up in step.uploads:
        cloud.receive(up.start, up.hidden)
    cloud.decide(step.position)
    return deciders


@pytest.mark.parametrize("length", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("mode", ["cloud", "collab"])
def test_threshold_one_equals_transformers_generate(tiny_model, length, mode):
    n = tiny_model.config.num_hidden_layers
    split = Split.create(n, (2, n // 2))
    engine = SplitEngine(tiny_model, split, HeadSet.lens(tiny_model, split.exits))
    prompt = random_prompt(tiny_model, length, seed=length)
    result = engine.generate(prompt, GenerationConfig(mode=mode, threshold=1.0, max_new_tokens=40, fp16=False))
    assert result.token_ids == hf_greedy(tiny_model, prompt, 40)
    assert result.stats.cloud_tokens == 40 and result.stats.edge_tokens == 0


def test_float16_upload_is_close_but_not_promised_exact(tiny_model):
    """float16 on the wire rounds the hidden states: tokens agree almost always, not by promise."""
    n = tiny_model.config.num_hidden_layers
    split = Split.create(n, (2, n // 2))
    engine = SplitEngine(tiny_model, split, HeadSet.lens(tiny_model, split.exits))
    same = total = 0
    for length in (1, 7, 33):
        prompt = random_prompt(tiny_model, length, seed=length)
        ref = hf_greedy(tiny_model, prompt, 40)
        got = engine.generate(prompt, GenerationConfig(mode="collab", threshold=1.0, max_new_tokens=40)).token_ids
        first_diff = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        same += first_diff
        total += len(ref)
    assert same / total > 0.8, f"float16 upload diverged early: {same}/{total} tokens before the first difference"


def test_upload_below_last_exit_and_eos_stop():
    model = make_tiny_model("gqa", seed=3, eos=7)
    split = Split.create(8, (2, 5), upload_layer=3)
    engine = SplitEngine(model, split, HeadSet.lens(model, split.exits))
    for seed in range(4):
        prompt = random_prompt(model, 5 + seed, seed)
        ref = hf_greedy(model, prompt, 40)
        got = engine.generate(prompt, GenerationConfig(mode="collab", threshold=1.0, max_new_tokens=40, fp16=False))
        assert got.token_ids == ref


def _full_model_decisions(model, ids, exits):
    """Argmax of the full model, and hidden states after each exit, for the last position of `ids`."""
    out = model(torch.tensor([ids]), output_hidden_states=True)
    return int(torch.argmax(out.logits[0, -1])), {e: out.hidden_states[e][:, -1:] for e in exits}


@pytest.mark.parametrize("name", ["mha", "gqa"])
@pytest.mark.parametrize("upload", [None, 2])
def test_early_exits_are_exact(name, upload):
    """Each cloud token is the full model's argmax, each exit token that exit's argmax, on the same prefix."""
    model = make_tiny_model(name, seed=1)
    n = model.config.num_hidden_layers
    split = Split.create(n, (2, 4), upload_layer=upload)
    heads = confident_heads(model, split.exits)
    engine = SplitEngine(model, split, heads)
    seen = set()
    with torch.inference_mode():
        for seed, length in [(0, 1), (1, 9), (2, 30)]:
            prompt = random_prompt(model, length, seed)
            result = engine.generate(prompt, GenerationConfig(mode="collab", threshold=0.8, max_new_tokens=40, fp16=False))
            ids = list(prompt)
            for record in result.tokens:
                full, hidden = _full_model_decisions(model, ids, split.exits)
                if record.decided_by == "cloud":
                    assert record.token_id == full, f"cloud token at {record.position}"
                else:
                    head_token, _ = heads.heads[record.decided_by].top1(hidden[record.decided_by], model.lm_head)
                    assert record.token_id == head_token, f"exit {record.decided_by} token at {record.position}"
                seen.add(record.decided_by)
                ids.append(record.token_id)
    assert seen == {"cloud", *split.exits}, f"every exit and the cloud must decide some tokens, saw {seen}"


@torch.inference_mode()
def test_every_kv_entry_equals_the_full_model():
    """After a generation with early exits, every cached key/value equals transformers' own cache."""
    model = make_tiny_model("gqa", seed=2)
    split = Split.create(8, (2, 5), upload_layer=3)
    runner = DecoderRunner(model)
    edge = EdgePartition(runner, split, confident_heads(model, split.exits), threshold=0.9)
    cloud = CloudPartition(runner, split)
    ids = random_prompt(model, 11, seed=5)
    exits_taken = run_split(edge, cloud, ids, 40) - {None}
    assert exits_taken == {2, 5}
    ref = model(torch.tensor([ids]), use_cache=True).past_key_values
    for layer in range(8):
        ref_k, ref_v = ref.layers[layer].keys[0], ref.layers[layer].values[0]  # [kv_heads, L, hd]
        caches = [c for c in (edge.cache, cloud.cache) if c.first_layer <= layer < c.first_layer + c.n_layers]
        assert caches, f"layer {layer} is cached nowhere"
        for cache in caches:
            k, v = cache.read(layer)
            assert k.shape[1] == len(ids), f"layer {layer} holds {k.shape[1]} of {len(ids)} positions"
            torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)


def test_standalone_never_runs_a_cloud_layer(monkeypatch):
    model = make_tiny_model("mha")
    split = Split.create(6, (2, 4))
    engine = SplitEngine(model, split, HeadSet.lens(model, split.exits))
    layers_run = []
    original = engine.runner.run_layer

    def counting(index, *args, **kwargs):
        layers_run.append(index)
        return original(index, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "run_layer", counting)
    lm_head_calls = []
    engine.runner.norm.register_forward_hook(lambda *a: lm_head_calls.append(1))
    for threshold in (1.0, 0.3):
        result = engine.generate(random_prompt(model, 8, 0), GenerationConfig(mode="standalone", threshold=threshold,
                                                                              max_new_tokens=20))
        assert len(result.token_ids) == 20
        assert result.stats.cloud_tokens == 0 and result.stats.bytes_up == 0
        assert all(r.decided_by in split.exits for r in result.tokens)
    assert layers_run and max(layers_run) < split.last_exit, "a cloud layer ran in standalone mode"
    assert not lm_head_calls, "the cloud's final norm ran in standalone mode"


def test_standalone_matches_last_exit_argmax():
    """With exits disabled below the last, standalone = the last exit head's greedy decoding."""
    model = make_tiny_model("gqa", seed=4)
    split = Split.create(8, (3,))
    heads = HeadSet.lens(model, split.exits)
    engine = SplitEngine(model, split, heads)
    prompt = random_prompt(model, 6, 1)
    result = engine.generate(prompt, GenerationConfig(mode="standalone", threshold=1.0, max_new_tokens=15))
    ids = list(prompt)
    with torch.inference_mode():
        for token in result.token_ids:
            _, hidden = _full_model_decisions(model, ids, (3,))
            assert token == heads.heads[3].top1(hidden[3], model.lm_head)[0]
            ids.append(token)


def test_stats_count_bytes_on_the_wire():
    model = make_tiny_model("mha")
    split = Split.create(6, (2, 4))
    engine = SplitEngine(model, split, HeadSet.lens(model, split.exits))
    prompt = random_prompt(model, 10, 0)
    r16 = engine.generate(prompt, GenerationConfig(mode="collab", threshold=1.0, max_new_tokens=5, fp16=True))
    r32 = engine.generate(prompt, GenerationConfig(mode="collab", threshold=1.0, max_new_tokens=5, fp16=False))
    # Every position but the last generated one is uploaded once: (10 + 4) rows of 64 values.
    assert r16.stats.bytes_up == 14 * 64 * 2
    assert r32.stats.bytes_up == 14 * 64 * 4
    assert r16.stats.edge_seconds > 0 and r16.stats.cloud_seconds > 0


@pytest.mark.parametrize("kwargs", [dict(threshold=1.5), dict(threshold=-0.1), dict(mode="fog"), dict(max_new_tokens=0)])
def test_bad_generation_config(kwargs):
    with pytest.raises(UserError):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize("upload", [1, 3, 6])
@torch.inference_mode()
def test_kv_exact_with_several_pending_depths(upload):
    """Three exits: a position held at exit 4 and the next at exit 2 pend as two groups at once;
    both are carried up exactly, and every upload-layer row reaches the cloud exactly once."""
    model = make_tiny_model("gqa", seed=2)
    split = Split.create(8, (2, 4, 6), upload_layer=upload)
    runner = DecoderRunner(model)
    edge = EdgePartition(runner, split, confident_heads(model, split.exits, scale=6.0), threshold=0.5)
    cloud = CloudPartition(runner, split)  # receive() raises on a missing or repeated row
    ids = random_prompt(model, 5, seed=5)
    groups = []
    exits_taken = run_split(edge, cloud, ids, 60, after_step=lambda: groups.append(len(edge._pending)))
    most_groups = max(groups)
    assert exits_taken == {2, 4, 6, None}
    assert most_groups >= 2, "no step left two pending groups: the multi-group path was not exercised"
    ref = model(torch.tensor([ids]), use_cache=True).past_key_values
    for layer in range(8):
        for cache in (edge.cache, cloud.cache):
            if cache.first_layer <= layer < cache.first_layer + cache.n_layers:
                k, v = cache.read(layer)  # each [kv_heads, L, hd]
                assert k.shape[1] == len(ids), f"layer {layer} holds {k.shape[1]} of {len(ids)} positions"
                torch.testing.assert_close(k, ref.layers[layer].keys[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(v, ref.layers[layer].values[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["cloud", "collab", "exact"])
def test_each_dtype_equals_transformers_in_that_dtype(tiny_model, dtype, mode):
    """Computing in bfloat16 or float16 (2-byte uploads in the model's own dtype: no rounding on the wire)
    gives transformers' greedy output of the same model in the same dtype."""
    model = tiny_model.to(dtype)
    n = model.config.num_hidden_layers
    split = Split.create(n, (2, n // 2))
    heads = confident_heads(model, split.exits, scale=6.0) if mode == "exact" else HeadSet.lens(model, split.exits)
    engine = SplitEngine(model, split, heads)
    config = GenerationConfig(mode=mode, threshold=0.5 if mode == "exact" else 1.0, max_new_tokens=24)
    assert config.wire_dtype(dtype) == dtype
    for length in (1, 33):
        prompt = random_prompt(model, length, seed=length)
        result = engine.generate(prompt, config)
        assert_greedy_equal(model, prompt, result.token_ids, hf_greedy(model, prompt, 24))
        if mode == "collab":  # every position's row went up once, 2 bytes a value
            assert result.stats.bytes_up == (length + 23) * model.config.hidden_size * 2
