"""The cloud partition of one device's sequence.

It works only from the hidden states the edge uploaded after the upload layer, one row per
position. A request names the last position; the cloud folds every received row up to it
into its KV cache (positions the edge decided itself included: that is how their deeper KV
gets filled, exactly), drops those hidden states, and returns one token.
"""

from __future__ import annotations

import torch

from cecollm.cache.kv import KVCache
from cecollm.cloud.batch import judge
from cecollm.errors import CecollmError
from cecollm.layers import DecoderRunner, top1
from cecollm.split import Split


class MissingPositions(CecollmError):
    """A request needs hidden states that have not been received yet."""


class CloudPartition:
    """Layers [upload layer, n_layers) of one sequence, fed by uploaded hidden states."""

    def __init__(self, runner: DecoderRunner, split: Split, cache: KVCache | None = None) -> None:
        self.runner = runner
        self.split = split
        first = split.upload_layer
        self.cache = cache if cache is not None else KVCache.for_runner(runner, first, split.n_layers - first)
        self.folded = 0  # positions already in the KV cache
        self._received: list[torch.Tensor] = []  # rows [folded, received), each [1, n, hidden]
        self.received = 0  # positions received so far

    @classmethod
    def resume(cls, runner: DecoderRunner, split: Split, cache: KVCache, folded: int) -> CloudPartition:
        """A partition over state held elsewhere: `cache` (e.g. over shared memory) already holds
        positions [0, folded) at every layer; rows from `folded` on come through receive()."""
        part = cls(runner, split, cache)
        cache.lengths = [folded] * cache.n_layers
        part.folded = part.received = folded
        return part

    def receive(self, start: int, hidden: torch.Tensor) -> None:
        """Take upload-layer rows [start, start+n) (any float dtype, hidden [1, n, hidden_size])."""
        if start != self.received:
            raise MissingPositions(f"upload starts at position {start}, expected {self.received}")
        self._received.append(hidden)
        self.received += hidden.shape[1]

    def decide(self, position: int) -> tuple[int, float]:
        """Greedy next token after `position` and its probability."""
        x = self._fold(position)
        return top1(self.runner.logits(x[:, -1:])[0, -1])

    def verify(self, position: int, drafts) -> tuple[int, int, float]:
        """Fold rows up to `position` and check the edge's drafts: `drafts[r]` is the token the edge put
        after row r (every folded row has one, but for `position` it may be missing: the edge waits).
        (row, token, prob): the first row whose draft is wrong and the full model's token after it
        (the state is then rolled back to row + 1 positions), or `position` and its token."""
        first = self.folded
        x = self._fold(position)
        rows = [r for r in range(first, position) if r in drafts] + [position]  # prompt rows have no draft
        verdict = judge(self.runner.logits(x[:, [r - first for r in rows]])[0], rows, drafts)  # [checked rows, vocab]
        if drafts.get(verdict.row, verdict.token) != verdict.token:
            self.rollback(verdict.row + 1)
        return verdict.row, verdict.token, verdict.prob

    def rollback(self, length: int) -> None:
        """Forget positions >= `length`: their rows came from a wrong token."""
        self.cache.truncate(length)
        self.folded = min(self.folded, length)
        rows = torch.cat(self._received, dim=1) if self._received else None  # [1, received-folded, hidden]
        keep = max(0, length - self.folded)
        self._received = [rows[:, :keep]] if rows is not None and keep else []
        self.received = min(self.received, length)

    def _fold(self, position: int) -> torch.Tensor:
        """Run rows [folded, position] through the cloud layers into the KV; their output [1, n, hidden]."""
        if position >= self.received:
            raise MissingPositions(f"position {position} not received (have {self.received})")
        if position < self.folded:
            raise MissingPositions(f"position {position} was already decided (folded {self.folded})")
        dtype = self.runner.embed.weight.dtype
        rows = torch.cat(self._received, dim=1).to(dtype)  # [1, received-folded, hidden]
        n = position + 1 - self.folded
        x, rest = rows[:, :n], rows[:, n:]
        self._received = [rest] if rest.shape[1] else []
        start = self.folded
        rope = self.runner.rope(start, position + 1, x)
        for index in range(self.split.upload_layer, self.split.n_layers):
            x = self.runner.run_layer(index, x, start, self.cache, rope)
        self.folded = position + 1
        return x
