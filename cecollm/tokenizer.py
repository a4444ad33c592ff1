"""A tokenizer without transformers: the `tokenizers` library over tokenizer.json, the chat template
rendered with jinja2 the way transformers renders it.

It offers what cecollm calls on a tokenizer (calling it, decode, apply_chat_template, chat_template,
the special tokens); tests/test_tokenizer.py checks it gives transformers' ids and text. A directory
whose tokenizer needs more (no tokenizer.json, clean-up of spaces) gets None from load_tokenizer and
the caller uses transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """The part of a transformers tokenizer cecollm uses."""

    def __init__(self, backend, config: dict, chat_template: str | None) -> None:
        self.backend = backend  # a tokenizers.Tokenizer
        self.chat_template = chat_template
        self.special_tokens = {}
        for name in _SPECIAL:
            value = config.get(name)
            if isinstance(value, dict):  # an AddedToken as older files write it
                value = value.get("content")
            self.special_tokens[name] = value
            setattr(self, name, value)
            setattr(self, name + "_id", backend.token_to_id(value) if isinstance(value, str) else None)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True):
        """The conversation rendered by the chat template (as transformers renders it), as ids or text."""
        text = self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @cached_property
    def _template(self):
        """transformers' jinja environment: sandboxed, trimmed blocks, loop controls, its tojson,
        raise_exception and strftime_now."""
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    """The directory's tokenizer, or None when it has none this class can stand in for."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    config = {}
    if (model_dir / "tokenizer_config.json").is_file():
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    if config.get("clean_up_tokenization_spaces") or config.get("add_bos_token") or config.get("add_eos_token"):
        return None  # transformers post-processes these; leave them to it
    template = config.get("chat_template")
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if template is not None and not isinstance(template, str):
        return None  # several named templates
    if template is not None and "{% generation" in template:
        return None  # transformers' assistant-mask extension
    from tokenizers import Tokenizer as Backend

    return Tokenizer(Backend.from_file(str(path)), config, template)
