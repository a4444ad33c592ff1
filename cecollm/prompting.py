"""Prompts: read them from data files, turn them into token ids, and generated ids back into text."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from cecollm.errors import UserError


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of `prompt`, wrapped in the chat template unless `raw`."""
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty")
    if tokenizer is None:
        raise UserError("this model directory has no tokenizer")
    if not raw:
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    return ids


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation (dicts with "role" and "content") through the chat template, ending
    with the assistant's turn to answer."""
    if tokenizer is None:
        raise UserError("this model directory has no tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template; pass --raw to use the prompt as is")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    return ids


def eos_ids(model) -> set[int]:
    """Token ids that end a generation, from the model's generation config."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


SUMMARY_REQUEST = "Summarize the following article in one sentence.\n\n"  # XSum documents become this request


def record_prompt(record: dict) -> str | None:
    """The user's prompt of a data record, by its fields (None when it has none of them):
    `prompt`; Alpaca `instruction` (+ `input`, after a blank line); XSum `document` (a summary
    request); TruthfulQA `question`; `text`."""
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    if isinstance(record.get("instruction"), str):
        extra = (record.get("input") or "").strip()
        return record["instruction"].strip() + (f"\n\n{extra}" if extra else "")
    if isinstance(record.get("document"), str):
        return SUMMARY_REQUEST + record["document"].strip()
    for key in ("question", "text"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


def read_records(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, in order; a UserError names the first bad line."""
    return [record for _, record in read_numbered_records(path)]


def read_numbered_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number from 1, JSON object) of each non-blank line of a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON may hold U+2028
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text: {exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise UserError(f"{path}:{number}: not JSON") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: a record is a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def read_prompt_file(path: str | Path) -> list[str]:
    """The user prompts of a JSON-lines file (see record_prompt), or the lines of a text file."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        if not path.is_file():
            raise UserError(f"file not found: {path}")
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for number, record in enumerate(read_records(path), 1):
        text = record_prompt(record)
        if text is None:
            raise UserError(f"{path}: record {number} has no prompt, instruction, document, question or text field")
        prompts.append(text)
    return prompts


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """--prompt, else --prompts FILE, else stdin lines (one prompt a line)."""
    if prompt is not None:
        return [prompt]
    if prompts_file:
        return read_prompt_file(prompts_file)
    if sys.stdin.isatty():
        raise UserError("give --prompt, --prompts FILE.jsonl, or prompts on stdin (one a line)")
    return [line for line in sys.stdin.read().splitlines() if line.strip()]


class TextStream:
    """Writes generated text to a stream as tokens are decided, whole characters only."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def add(self, record) -> None:
        self.ids.append(record.token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
        self.ids, self.printed = [], 0
