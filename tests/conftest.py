"""Tiny random Llama models built from a config: fast, nothing downloaded."""

from __future__ import annotations

import os

# Every test computes in float32 unless it says otherwise (the machine's default may be bfloat16): set
# before cecollm's config dataclasses and command lines take their defaults, inherited by subprocesses.
os.environ["CECOLLM_DTYPE"] = "float32"

import pytest  # noqa: E402
import torch
import zmq
from transformers import LlamaConfig, LlamaForCausalLM

TINY_CONFIGS = {
    # multi-head attention, untied embeddings
    "mha": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False),
    # grouped-query attention (3 query heads per kv head), tied embeddings like SmolLM2
    "gqa": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=8, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=640, tie_word_embeddings=True, rope_theta=100000.0),
}


def make_tiny_model(name: str, seed: int = 0, eos: int | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=512, eos_token_id=eos, bos_token_id=None,
                         pad_token_id=None, attn_implementation="sdpa", **TINY_CONFIGS[name])
    model = LlamaForCausalLM(config)
    # Larger-than-default weights give peakier, more varied next-token distributions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return make_tiny_model(request.param)


def hf_greedy(model, prompt_ids, max_new_tokens):
    """transformers' own greedy generation: the reference."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0)
    return out[0, len(prompt_ids):].tolist()


NEAR_TIE = 1e-2  # logits this close (relative) are a tie in bfloat16 (8 bits of mantissa) and float16 arithmetic


def assert_greedy_equal(model, prompt_ids, got, ref, near_tie: float = NEAR_TIE):
    """`got` is transformers' greedy output `ref`, or parts from it only at a near-tie: where they first
    differ, transformers' own logits of the two tokens (after the common prefix) are within `near_tie`.
    In bfloat16 and float16 one row at a time and several at once may round differently (float32 is
    asserted equal, token for token)."""
    if got == ref:
        return
    i = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    assert i < min(len(got), len(ref)), f"lengths differ: {len(got)} tokens, transformers {len(ref)}"
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + ref[:i]])).logits[0, -1].float()
    a, b = float(logits[got[i]]), float(logits[ref[i]])
    assert abs(a - b) <= near_tie * max(1.0, abs(b)), \
        f"token {i}: {got[i]} (logit {a:.5f}) where transformers has {ref[i]} (logit {b:.5f}): no near-tie"


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained in milliseconds on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The capital of France is Paris.", "Tell me a story about a cat and a dog.",
            "Edge devices run the first layers; the cloud runs the rest."] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None,
                                   unk_token=None, pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny GQA model with a tokenizer, saved as a transformers directory (what --model takes)."""
    model = make_tiny_model("gqa", eos=2)
    tokenizer = make_tiny_tokenizer(model.config.vocab_size)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GQA model with a tokenizer and no EOS (every generation runs to max_new_tokens), saved
    once per test module: what brokers, edges and tools take as --model."""
    model = make_tiny_model("gqa")
    path = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(path)
    make_tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The tiny model of `model_dir`, loaded as an edge loads it."""
    from cecollm.loading import load_model

    return load_model(str(model_dir))


class Collect:
    """A stand-in for a ZeroMQ socket that keeps what is sent: [frames as bytes] per message."""

    def __init__(self):
        self.sent = []

    def send_multipart(self, frames, copy=True, flags=0):
        self.sent.append([f.bytes if isinstance(f, zmq.Frame) else bytes(f) for f in frames])

    def setsockopt(self, option, value):
        pass


def frames_of(*parts):
    """A received message's frames, as a serving loop gets them."""
    return [zmq.Frame(bytes(p)) for p in parts]
