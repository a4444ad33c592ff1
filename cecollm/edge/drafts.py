"""The exact mode's book of drafts: what the edge drafted, what the cloud confirmed, where to roll back.

The edge drafts a token at every position (the deciding exit's top-1) and goes on at once; the
cloud checks each draft against the full model one row later. A verdict names a row r and the
full model's token after it: if the edge's draft after r is that token, every draft up to it
holds (the cloud checks in order and answers at the first wrong one); if not, the drafts from
r + 1 on are wrong, the edge rolls back to r + 1 positions and takes the cloud's token. Only
confirmed tokens are shown: a user never sees a token taken back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cecollm.generation import TokenRecord


@dataclass
class ExactTokenRecord(TokenRecord):
    """A shown token of the exact mode: `decided_by` is the exit whose draft the cloud confirmed, or
    "cloud" (the cloud corrected a draft, or the edge waited for it); `verified` is False only for
    tokens the edge decided alone after the cloud was lost."""

    verified: bool = True


@dataclass
class _Draft:
    token: int
    exit: int | str  # the drafting exit, or "cloud" for a token the cloud gave
    confidence: float


class DraftBook:
    """The generated tokens of one exact generation: drafted, confirmed, rolled back."""

    def __init__(self, prompt_length: int, max_new_tokens: int, eos: set[int],
                 on_token: Callable[[TokenRecord], None] | None = None) -> None:
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.on_token = on_token
        self.drafts: list[_Draft] = []  # generated tokens: [0, confirmed) confirmed, the rest drafts
        self.confirmed = 0
        self.shown: list[ExactTokenRecord] = []

    # ---- positions ---------------------------------------------------------------------
    def row_of(self, index: int) -> int:
        """The row whose next token is generated token `index`."""
        return self.prompt_length + index - 1

    def draft_after(self, row: int) -> int | None:
        """The drafted token after `row`, if any (what the cloud checks)."""
        index = row + 1 - self.prompt_length
        return self.drafts[index].token if 0 <= index < len(self.drafts) else None

    def unconfirmed_rows(self) -> dict[int, int]:
        """row -> drafted token after it, for every draft not confirmed yet."""
        return {self.row_of(i): d.token for i, d in enumerate(self.drafts) if i >= self.confirmed}

    # ---- state ---------------------------------------------------------------------------
    @property
    def drafting_done(self) -> bool:
        """No more drafts: the budget is drafted, or the last draft ends the generation."""
        return len(self.drafts) >= self.max_new_tokens or bool(self.drafts) and self.drafts[-1].token in self.eos

    @property
    def done(self) -> bool:
        """Every token of the answer is confirmed."""
        return self.drafting_done and self.confirmed == len(self.drafts)

    def last_token(self) -> int:
        return self.drafts[-1].token

    def draft(self, token: int, exit: int, confidence: float) -> None:
        assert not self.drafting_done, "no draft past the end of the generation"
        self.drafts.append(_Draft(token, exit, confidence))

    # ---- verdicts ------------------------------------------------------------------------
    def verdict(self, row: int, token: int, prob: float) -> int | None:
        """The cloud's token after `row`. Confirms the drafts up to it; on a wrong draft the later ones
        go, the cloud's token takes its place, and the result is the length to roll back to."""
        index = row + 1 - self.prompt_length
        assert self.confirmed <= index <= len(self.drafts), (
            f"verdict for token {index}, {self.confirmed} confirmed and {len(self.drafts)} drafted")
        if index < len(self.drafts) and self.drafts[index].token == token:
            self._confirm(index + 1)
            return None
        rollback = index < len(self.drafts)  # a wrong draft, not a token the edge waited for
        del self.drafts[index:]
        self.drafts.append(_Draft(token, "cloud", prob))
        self._confirm(index + 1)
        return row + 1 if rollback else None

    def go_unverified(self) -> None:
        """The cloud is lost: the drafts so far, and every later token, are shown unverified."""
        self._confirm(len(self.drafts), verified=False)

    def take_unverified(self, token: int, exit: int, confidence: float) -> None:
        """A token the edge decided alone (the cloud is lost): shown at once, unverified."""
        self.drafts.append(_Draft(token, exit, confidence))
        self._confirm(len(self.drafts), verified=False)

    def _confirm(self, upto: int, verified: bool = True) -> None:
        for index in range(self.confirmed, upto):
            d = self.drafts[index]
            record = ExactTokenRecord(self.prompt_length + index, d.token, d.exit, d.confidence, verified)
            self.shown.append(record)
            if self.on_token:
                self.on_token(record)
        self.confirmed = max(self.confirmed, upto)
