"""Training text: records from jsonl or text files, turned into chat-templated token ids.

Formats are recognised per record by their fields:
- Alpaca `instruction`, `input`, `output`: user = instruction (+ input), assistant = output.
  The last `holdout` records of every Alpaca-format file are held out for evaluation.
- XSum `document`, `summary`: user = a summarisation request with the document.
- TruthfulQA `question`, `answer` (a list): user = question, assistant = the first answer.
- `prompt`, `response` (what `cecollm exits-selfgen` writes): a chat pair.
- `text`, or a plain text file (split at blank lines): raw text without a template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cecollm.errors import UserError
from cecollm.exits.config import HOLDOUT
from cecollm.prompting import read_records, record_prompt

TEXT_CHUNK_CHARS = 2000  # plain text files are cut into pieces of about this size


@dataclass(frozen=True)
class Example:
    """One training document: a chat pair, or raw text when `prompt` is None."""

    source: str  # "file:record" for messages and provenance
    prompt: str | None  # the user's turn; None for raw text
    response: str  # the assistant's turn, or the raw text


def _from_record(record: dict, source: str) -> Example | None:
    if "instruction" in record:
        return Example(source, record_prompt(record), record.get("output", ""))
    if "document" in record and "summary" in record:
        return Example(source, record_prompt(record), record["summary"])
    if "question" in record and "answer" in record:
        answer = record["answer"]
        answer = answer[0] if isinstance(answer, list) and answer else answer
        return Example(source, record["question"], str(answer or ""))
    if "prompt" in record and "response" in record:
        return Example(source, record["prompt"], record["response"])
    if "text" in record:
        return Example(source, None, record["text"])
    return None


def is_alpaca(records: list[dict]) -> bool:
    return bool(records) and all("instruction" in r for r in records)


def split_records(records: list[dict], part: str, holdout: int = HOLDOUT) -> list[tuple[int, dict]]:
    """(index, record) of the `train` or `heldout` part; only Alpaca files hold records out."""
    indexed = list(enumerate(records))
    if not is_alpaca(records) or holdout <= 0:
        return indexed if part == "train" else []
    cut = max(0, len(records) - holdout)
    return indexed[:cut] if part == "train" else indexed[cut:]


def read_file(path: str | Path, part: str = "train", holdout: int = HOLDOUT) -> list[Example]:
    """Examples of one file (jsonl, json lines with known fields, or plain text)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        records = read_records(path)
        out = []
        for index, record in split_records(records, part, holdout):
            example = _from_record(record, f"{path.name}:{index}")
            if example is None:
                raise UserError(f"{path}:{index + 1}: unknown record fields; see `cecollm train-exits --help`")
            if example.response.strip():
                out.append(example)
        return out
    if part != "train":
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    chunks, current = [], ""
    for para in text.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= TEXT_CHUNK_CHARS:
            chunks.append(current)
            current = ""
    if current.strip():
        chunks.append(current)
    return [Example(f"{path.name}:{i}", None, c) for i, c in enumerate(chunks)]


def read_examples(paths, part: str = "train", holdout: int = HOLDOUT) -> list[Example]:
    """Examples of all files, interleaved round-robin so that a token budget takes a mix."""
    if not paths:
        raise UserError("no data files given (--data FILE)")
    per_file = [read_file(p, part, holdout) for p in paths]
    out = []
    for i in range(max((len(e) for e in per_file), default=0)):
        out.extend(examples[i] for examples in per_file if i < len(examples))
    if not out and part == "train":
        raise UserError("the data files hold no training text")
    return out


class ChatEncoder:
    """Token ids of examples as the edge sees them: chat template, the assistant's answer."""

    def __init__(self, tokenizer) -> None:
        if tokenizer is None:
            raise UserError("this model has no tokenizer; training text cannot be encoded")
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.prefix = self._shared_prefix() if self.chat else 0

    def _template(self, prompt: str, response: str | None) -> list[int]:
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=response is None)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _shared_prefix(self) -> int:
        """Length of the template's fixed start (system prompt): the same in every example."""
        a, b = self._template("a", "x"), self._template("b", "x")
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def encode(self, example: Example, max_len: int) -> tuple[list[int], int]:
        """(ids, first trained position): positions before it are the fixed template start."""
        ids, first, _ = self.encode_parts(example, max_len)
        return ids, first

    def encode_parts(self, example: Example, max_len: int) -> tuple[list[int], int, int]:
        """(ids, first trained position, first answer position); raw text is all answer."""
        tok = self.tokenizer
        if example.prompt is None:
            ids = tok(example.response, add_special_tokens=False)["input_ids"]
            return list(ids)[:max_len], 0, 0
        if self.chat:
            prompt_ids = self._template(example.prompt, None)
            full = self._template(example.prompt, example.response)
            # Long documents: keep the end of the prompt so the answer always fits.
            answer = full[len(prompt_ids):]
            room = max_len - len(answer)
            if room < len(prompt_ids):
                keep = max(room - self.prefix, 0)
                prompt_ids = prompt_ids[: self.prefix] + (prompt_ids[len(prompt_ids) - keep:] if keep else [])
            return (prompt_ids + answer)[:max_len], min(self.prefix, max_len), len(prompt_ids)
        prompt = list(tok(example.prompt + "\n\n", add_special_tokens=False)["input_ids"])
        ids = tok(example.prompt + "\n\n" + example.response, add_special_tokens=False)["input_ids"]
        return list(ids)[:max_len], 0, min(len(prompt), max_len)
