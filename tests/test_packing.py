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
        for rows in (1, 5, packing.MAX_PACKED_ROWS):
            x = torch.randn(1, rows, hidden).to(torch.bfloat16)
            assert torch.equal(model.lm_head(x), plain.lm_head(x)), rows
            qkv = packing.fused_rows(x, layer.self_attn, "packed_qkv")
            attn = plain.model.layers[0].self_attn
            for got, linear in zip(qkv, (attn.q_proj, attn.k_proj, attn.v_proj)):
                assert torch.equal(got, F.linear(x, linear.weight)), rows
            gate, up = packing.fused_rows(x, layer.mlp, "packed_gate_up")
            assert torch.equal(gate, F.linear(x, plain.model.layers[0].mlp.gate_proj.weight))
            assert torch.equal(up, F.linear(x, plain.model.layers[0].mlp.up_proj.weight))


def test_more_rows_get_each_row_its_one_row_bits():
    """Past MAX_PACKED_ROWS rows go in pieces, so each row comes out as it does alone (F.linear's one-row bits),
    however many rows a pass has."""
    model = bf16_model("gqa")
    plain = copy.deepcopy(model)
    packing.pack_linears(model)
    rows = 2 * packing.MAX_PACKED_ROWS + 7
    x = torch.randn(1, rows, model.config.hidden_size).to(torch.bfloat16)
    with torch.inference_mode():
        head = model.lm_head(x)
        gate, up = packing.fused_rows(x, model.model.layers[1].mlp, "packed_gate_up")
        mlp = plain.model.layers[1].mlp
        for r in range(rows):
            one = x[:, r:r + 1]
            assert torch.equal(head[:, r:r + 1], plain.lm_head(one)), r
            assert torch.equal(gate[:, r:r + 1], F.linear(one, mlp.gate_proj.weight)), r
            assert torch.equal(up[:, r:r + 1], F.linear(one, mlp.up_proj.weight)), r


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
@pytest.mark.parametrize("prompt_len", [7, 32])  # prompt passes of up to MAX_PACKED_ROWS: F.linear's bits
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
    monkeypatch.setattr(packing, "_agrees", lambda weights, bias: False)
    assert packing.pack_linears(model) == 0
    assert not any(k.startswith("packed") for m in model.modules() for k in m.__dict__)


def test_gradients_go_through_f_linear():
    model = bf16_model("mha")
    packing.pack_linears(model)
    x = torch.randn(1, 2, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    model.lm_head(x).float().sum().backward()  # the packed product has no backward; F.linear has
    assert x.grad is not None and x.grad.shape == x.shape


def teacher_forced(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits [len(continuation), vocab] of the continuation's rows passed in one call after the prompt (as a
    verification of drafts passes them)."""
    runner = DecoderRunner(model)
    cache = KVCache.for_runner(runner, 0, runner.n_layers)
    with torch.inference_mode():
        for start, ids in ((0, prompt), (len(prompt), continuation)):
            x = runner.embed(torch.tensor([ids]))
            rope = runner.rope(start, start + len(ids), x)
            for i in range(runner.n_layers):
                x = runner.run_layer(i, x, start, cache, rope)
        return runner.logits(x)[0]


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_rows_passed_together_get_the_bits_of_rows_decoded_one_at_a_time(name):
    """In bfloat16 the exact mode's verification is bit for bit the decoding it stands for: the packed products
    give a row the same bits among up to 32 rows as alone, and attention runs row by row. (In float32, MKL's
    products of several rows round apart from one row's: equal up to near-ties, as the float32 tests assert.)"""
    model = make_tiny_model(name).to(torch.bfloat16)
    packing.pack_linears(model)
    prompt = [(7 * i + 3) % model.config.vocab_size for i in range(11)]
    tokens, logits = decode(model, prompt, 9)
    together = teacher_forced(model, prompt, tokens[:8])  # row i follows tokens[i]: the logits of step i + 1
    for i in range(8):
        assert torch.equal(together[i], logits[i + 1]), f"row {i}"



def test_an_unpacked_copy_computes_on_its_own_weights():
    """A copy of a packed layer (an exit head made of one) has no packed weights: it can be copied at all, and
    weights loaded into it later are the ones it computes with."""
    model = bf16_model("mha")
    packing.pack_linears(model)
    layer = model.model.layers[0]
    assert type(layer.self_attn.o_proj).__name__.startswith("Packed")
    assert not layer.self_attn.o_proj.weight.requires_grad  # packed: for inference
    clone = packing.unpacked_copy(layer)
    assert not any(k.startswith("packed") for m in clone.modules() for k in m.__dict__)
    assert not type(clone.self_attn.o_proj).__name__.startswith("Packed")
    with torch.no_grad():
        clone.self_attn.o_proj.weight.mul_(2)
    x = torch.randn(1, 3, model.config.hidden_size).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(clone.self_attn.o_proj(x), F.linear(x, clone.self_attn.o_proj.weight))
        assert not torch.equal(clone.self_attn.o_proj(x), layer.self_attn.o_proj(x))


def test_a_bfloat16_worker_computes_what_one_process_computes(tmp_path):
    """Through a broker and a worker in bfloat16, each cloud token and its probability are those of one process
    running the whole packed model, bit for bit, after a prompt of more than MAX_PACKED_ROWS rows (F.linear
    rounds such a pass otherwise: a worker that did not pack its weights fails here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cecollm.broker.launch import BrokerProcess
    from cecollm.edge.client import EdgeClient, EdgeConfig
    from cecollm.edge.heads import HeadSet
    from cecollm.spec import ModelSpec
    from cecollm.split import Split
    from tests.conftest import make_tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=1024, tie_word_embeddings=True,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    path = tmp_path / "width576"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    make_tiny_tokenizer(config.vocab_size).save_pretrained(path)
    loaded = ModelSpec(model=str(path), dtype="bfloat16").load()
    assert "packed" in loaded.model.lm_head.__dict__
    split = Split.create(3, (1,))
    prompt = [(11 * i + 7) % config.vocab_size for i in range(packing.MAX_PACKED_ROWS + 8)]
    tokens, logits = decode(loaded.model, prompt, 6)
    want = [(token, top1(step)[1]) for token, step in zip(tokens, logits)]
    extra = ["--exits", "1", "--dtype", "bfloat16"]
    with BrokerProcess(str(path), workers=1, extra=extra, log_path=tmp_path / "broker.log") as b:
        edge = EdgeConfig(device_id=1, broker=b.request_address, upload=b.upload_address, keys=b.device_keys,
                          exact=False, threshold=1.0, max_new_tokens=6, timeout=30.0)
        with EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, split.exits), edge) as client:
            result = client.generate(prompt)
    assert all(t.decided_by == "cloud" for t in result.tokens)
    assert [(t.token_id, t.confidence) for t in result.tokens] == want


def test_a_loaded_reduced_vocabulary_head_computes_on_packed_weights_with_their_bits(tmp_path):
    """An exit head of a bfloat16 model, loaded from its file, runs its rows of the LM head on packed weights
    (its small adapter products stay on F.linear, as fast there), and every row gets the bits the head's
    unpacked copy gives it alone."""
    from cecollm.edge.heads import AdapterHead, HeadSet

    model = bf16_model("gqa")
    packing.pack_linears(model)
    head = AdapterHead(model, rank=8, vocab=64)
    torch.nn.init.normal_(head.up.weight, std=0.1)
    torch.nn.init.normal_(head.other.weight, std=0.1)
    head.set_tokens(torch.arange(64) * 3)
    path = tmp_path / "heads.safetensors"
    HeadSet((2,), {2: head}, "adapter", {"rank": 8, "vocab": 64}).save(path)
    loaded = HeadSet.load(path, model, "").heads[2]
    hidden = torch.randn(1, 6, model.config.hidden_size).to(torch.bfloat16)
    with torch.inference_mode():
        together = loaded.class_logits(hidden, model.lm_head)  # [1, 6, 65]
        assert loaded.__dict__.get("packed_rows") is not None, "the head's rows of the LM head are packed"
        plain = packing.unpacked_copy(loaded)  # a copy after use: without the packed rows as well
        assert plain.__dict__.get("packed_rows") is None
        for t in range(hidden.shape[1]):
            row = hidden[:, t:t + 1]
            alone = plain.class_logits(row, model.lm_head)
            assert torch.equal(together[:, t:t + 1], alone), t
            assert loaded.top1(row, model.lm_head) == plain.top1(row, model.lm_head)
