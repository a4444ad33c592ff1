"""Turn a user's prompt into token ids, and generated ids back into text."""

from __future__ import annotations

from cecollm.errors import UserError


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of `prompt`, wrapped in the chat template unless `raw`."""
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty")
    if tokenizer is None:
        raise UserError("this model directory has no tokenizer")
    if raw:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("this model's tokenizer has no chat template; pass --raw to use the prompt as is")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
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
