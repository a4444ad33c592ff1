"""The model's own greedy answers to training prompts, written as jsonl training text.

Generation is what the edge sees, so answers the model wrote itself are the most relevant
training text; they cost about 100x more per token than teacher-forced text, so prompts are
answered in batches (left padding) and the output file grows as batches finish: running the
same command again skips prompts already answered (resume).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from cecollm.errors import UserError
from cecollm.exits.data import ChatEncoder, Example


def _prompt_ids(encoder: ChatEncoder, prompt: str, max_prompt: int) -> list[int]:
    """The chat-templated prompt, cut to max_prompt tokens by dropping the middle of the text."""
    full = encoder._template(prompt, None) if encoder.chat else list(encoder.tokenizer(prompt)["input_ids"])
    if len(full) <= max_prompt:
        return full
    head = encoder.prefix
    return full[:head] + full[len(full) - (max_prompt - head):]


def answered(path: Path) -> set[str]:
    """Sources already answered in `path` (an earlier run's output); a foreign file is a UserError."""
    if not path.is_file():
        return set()
    done = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["source"])
        except (ValueError, TypeError, KeyError):
            raise UserError(f"{path}:{n}: not an exits-selfgen record; --out appends to its own earlier output") from None
    return done


@torch.inference_mode()
def generate_answers(loaded, examples: list[Example], out: Path, max_new_tokens: int = 96,
                     batch_size: int = 16, max_prompt: int = 448) -> int:
    """Answer each example's prompt greedily; append {"source","prompt","response"} lines."""
    examples = [e for e in examples if e.prompt is not None]
    if not examples:
        raise UserError("no prompts in the data files (raw text has none)")
    done = answered(out)
    todo = [e for e in examples if e.source not in done]
    tok = loaded.tokenizer
    encoder = ChatEncoder(tok)
    model = loaded.model
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (tok.pad_token_id or 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    bar = tqdm(total=len(todo), desc="self-answers", unit="prompt")
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        ids = [_prompt_ids(encoder, e.prompt, max_prompt) for e in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # [B, width], left-padded
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        gen = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad)
        with open(out, "a", encoding="utf-8") as f:
            for e, row in zip(batch, gen[:, width:].tolist()):
                text = tok.decode(row, skip_special_tokens=True).strip()
                f.write(json.dumps({"source": e.source, "prompt": e.prompt, "response": text}) + "\n")
                written += 1
        bar.update(len(batch))
    bar.close()
    return written
