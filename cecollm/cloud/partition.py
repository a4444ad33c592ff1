"""The cloud partition of one device's sequence.

It works only from the hidden states the edge uploaded after the upload layer, one row per
position. A request names the last position; the cloud folds every received row up to it
into its KV cache (positions the edge decided itself included: that is how their deeper KV
gets filled, exactly), drops those hidden states, and returns one token.
"""

from __future__ import annotations

import torch

from cecollm.cache.kv import KVCache
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
        return top1(self.runner.logits(x[:, -1:])[0, -1])
