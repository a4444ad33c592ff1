"""The greedy decoding loop and what a generation produces, shared by every way of generating
(the in-process engine, the edge client, the benchmark's baselines)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


class StopGeneration(Exception):
    """Raised by an `on_token` callback to end the generation after the token it was given (a stop
    string was found, say): the tokens so far, that one included, are the result."""


@dataclass
class TokenRecord:
    position: int  # position of the generated token in the whole sequence
    token_id: int
    decided_by: int | str  # the exit's layer count, or "cloud"
    confidence: float  # top-1 probability where it was decided


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    edge_tokens: int = 0  # tokens decided by an exit
    cloud_tokens: int = 0  # tokens decided by the cloud partition (or the whole model)
    edge_seconds: float = 0.0  # compute in the edge partition
    cloud_seconds: float = 0.0  # compute in the cloud partition (or the whole model)
    bytes_up: int = 0  # bytes the cloud would receive: hidden states (or token ids) on the wire
    drafts: int = 0  # exact mode: tokens the edge drafted (rolled-back ones included)
    rollbacks: int = 0  # exact mode: wrong drafts, each a roll-back of both KV caches


@dataclass
class GenerationResult:
    token_ids: list[int]
    tokens: list[TokenRecord]
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_dict(self, text: str | None = None) -> dict:
        out = {"token_ids": self.token_ids}
        if text is not None:
            out["text"] = text
        out["tokens"] = [asdict(t) for t in self.tokens]
        out["stats"] = asdict(self.stats)
        return out


def decode_greedily(prompt_ids, max_new_tokens: int, eos: set[int], decide, result: GenerationResult,
                    on_token: Callable[[TokenRecord], None] | None = None) -> None:
    """The generation loop: `decide(input_ids)` feeds the next inputs (the prompt, then the last
    token) and returns (token, decided_by, confidence); records go into `result` and to
    `on_token` as they come. `on_token` may raise StopGeneration to end it there."""
    inputs, position = list(prompt_ids), len(prompt_ids)
    for _ in range(max_new_tokens):
        token, decided_by, conf = decide(inputs)
        record = TokenRecord(position, token, decided_by, conf)
        result.token_ids.append(token)
        result.tokens.append(record)
        if on_token:
            try:
                on_token(record)
            except StopGeneration:
                break
        if token in eos:
            break
        inputs, position = [token], position + 1
