"""The exact mode in one process: drafts, verdicts and roll-backs of both KV caches.

A property-based test (hypothesis) drives random accept/reject patterns (drafts made wrong on
purpose, checks at random lags, aborted edge steps) through the roll-back of the edge's and the
cloud's KV caches, then checks the output against transformers' greedy generate and every KV
entry of every layer against transformers' own past_key_values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine import confident_heads, random_prompt

from cecollm.cloud.partition import CloudPartition
from cecollm.config import GenerationConfig
from cecollm.edge.drafts import DraftBook
from cecollm.edge.heads import HeadSet
from cecollm.edge.partition import EdgePartition
from cecollm.engine import SplitEngine
from cecollm.layers import DecoderRunner
from cecollm.split import Split

from conftest import hf_greedy, make_tiny_model

MODEL = make_tiny_model("gqa")  # 8 layers
REFERENCE: dict[tuple, list[int]] = {}


def _reference(prompt: tuple, n: int) -> list[int]:
    if prompt not in REFERENCE:
        REFERENCE[prompt] = hf_greedy(MODEL, list(prompt), 24)
    return REFERENCE[prompt][:n]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_the_book_confirms_in_order_and_rolls_back_at_the_first_wrong_draft():
    shown = []
    book = DraftBook(prompt_length=3, max_new_tokens=4, eos={99}, on_token=shown.append)
    for token in (10, 11, 12):
        book.draft(token, 2, 0.9)
    assert book.unconfirmed_rows() == {2: 10, 3: 11, 4: 12}
    assert book.verdict(3, 11, 0.8) is None  # drafts after rows 2 and 3 hold
    assert [r.token_id for r in shown] == [10, 11] and book.confirmed == 2
    assert book.verdict(4, 50, 0.7) == 5  # the draft after row 4 was wrong: keep 5 positions
    assert [r.token_id for r in shown] == [10, 11, 50] and shown[-1].decided_by == "cloud"
    assert not book.drafting_done and book.verdict(5, 99, 0.6) is None  # a token the edge waited for
    assert book.done and [r.token_id for r in shown] == [10, 11, 50, 99] and all(r.verified for r in shown)


def test_going_unverified_shows_the_drafts_marked():
    shown = []
    book = DraftBook(1, 3, set(), shown.append)
    book.draft(5, 4, 0.5)
    book.go_unverified()
    book.take_unverified(6, 4, 0.4)
    assert [(r.token_id, r.verified) for r in shown] == [(5, False), (6, False)]


@pytest.mark.parametrize("name", ["mha", "gqa"])
@pytest.mark.parametrize("verify_every", [1, 3])
@pytest.mark.parametrize("threshold", [0.5, 0.8, 1.0])
def test_exact_mode_equals_transformers_at_any_threshold(name, verify_every, threshold):
    model = make_tiny_model(name)
    n = model.config.num_hidden_layers
    split = Split.create(n, (2, n // 2))
    engine = SplitEngine(model, split, confident_heads(model, split.exits, scale=6.0))
    for length in (1, 9, 33):
        prompt = random_prompt(model, length, seed=length)
        config = GenerationConfig(mode="exact", threshold=threshold, max_new_tokens=32, fp16=False)
        with torch.inference_mode():
            result = engine._generate_exact(prompt, config, None, verify_every)
        assert result.token_ids == hf_greedy(model, prompt, 32)
        assert result.stats.drafts >= 32 and len(result.tokens) == 32


def test_exact_mode_waits_below_the_confidence_it_is_told():
    split = Split.create(8, (2, 4))
    engine = SplitEngine(MODEL, split, HeadSet.lens(MODEL, split.exits))
    prompt = random_prompt(MODEL, 5, seed=1)
    always = engine.generate(prompt, GenerationConfig(mode="exact", max_new_tokens=20, fp16=False, wait_below=1.0))
    assert always.stats.drafts == 0 and always.stats.cloud_tokens == 20  # never drafts: the paper's threshold 1.0
    assert always.token_ids == _reference(tuple(prompt), 20)


def _check_kv(edge: EdgePartition, cloud: CloudPartition, ids: list[int]) -> None:
    ref = MODEL(torch.tensor([ids]), use_cache=True).past_key_values
    for cache, length in ((edge.cache, len(ids)), (cloud.cache, cloud.folded)):
        for layer in range(cache.first_layer, cache.first_layer + cache.n_layers):
            k, v = cache.read(layer)  # each [kv_heads, L, hd]
            assert k.shape[1] == length, f"layer {layer} holds {k.shape[1]} of {length} positions"
            torch.testing.assert_close(k, ref.layers[layer].keys[0][:, :length], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, ref.layers[layer].values[0][:, :length], rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_length=st.integers(1, 12), upload_layer=st.integers(2, 5),
       plan=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_random_accept_reject_patterns_leave_both_kv_caches_exact(prompt_length, upload_layer, plan):
    """plan[i] = (make the draft wrong, verify after this step, abort the next step halfway)."""
    prompt = random_prompt(MODEL, prompt_length, seed=prompt_length)
    split = Split.create(8, (2, 5), upload_layer)
    runner = DecoderRunner(MODEL)
    edge = EdgePartition(runner, split, confident_heads(MODEL, split.exits, scale=6.0), 0.5, last_exit_decides=True)
    cloud = CloudPartition(runner, split)
    book = DraftBook(prompt_length, 16, set())
    reference = _reference(tuple(prompt), 16)
    inputs, steps, rollbacks, wrong_drafts = list(prompt), 0, 0, 0
    with torch.inference_mode():
        while not book.done:
            wrong, check, abort_next = plan[steps % len(plan)]
            steps += 1
            if book.drafting_done:
                uploads = edge.flush()
            else:
                if abort_next:  # a verdict "arrives" after the first layer: the step stops, its KV is cut
                    layers = iter(range(1))
                    assert edge.step(inputs, abort=lambda layers=layers: next(layers, None) is None) is None
                    edge.rollback(edge.length)
                out = edge.step(inputs)
                uploads = out.uploads
                token = (out.token + 1) % MODEL.config.vocab_size if wrong else out.token
                wrong_drafts += token != reference[len(book.drafts)]
                book.draft(token, out.exit, out.confidence)
                inputs = [token]
            for up in uploads:
                cloud.receive(up.start, up.hidden)
            row = cloud.received - 1
            if not (check or book.drafting_done) or row + 1 - prompt_length < book.confirmed:
                continue
            checked, token, prob = cloud.verify(row, book.unconfirmed_rows())
            rollback = book.verdict(checked, token, prob)
            if rollback is not None:
                edge.rollback(rollback)
                rollbacks += 1
                inputs = [token]
            assert steps < 2000, "the exact loop makes progress"
        answer = [r.token_id for r in book.shown]
        assert answer == reference
        assert (rollbacks > 0) == (wrong_drafts > 0)  # a wrong draft is always rolled back, a right one never
        edge.flush()  # every pending row through every edge layer
        _check_kv(edge, cloud, list(prompt) + answer[:edge.length - prompt_length])
