"""The edge partition: embeddings, decoder layers up to the last exit, exit heads.

Exact KV with early exits. When a position exits at layer e, the layers at and above e have
no KV for it yet. Its hidden state after e layers is kept as a pending row; the next step
prepends it to the new rows when the layer loop reaches e, so it runs through the missing
layers with the real hidden states, exactly as the full model would. Pending groups are
contiguous, ordered by position, and their depths fall strictly with position, so at layer
`i` the only group that can join is the last one.

A step changes the partition's bookkeeping only when it completes: one aborted at a layer
boundary (the exact mode's roll-back arrived) leaves the pending rows as they were, and
`rollback(length)` then cuts the KV of every layer and the pending rows back to `length`
positions, which is exactly the state after feeding only those positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cecollm.cache.kv import KVCache
from cecollm.edge.heads import HeadSet
from cecollm.layers import DecoderRunner
from cecollm.split import Split


@dataclass
class Upload:
    """Hidden states after the upload layer for positions [start, start + n)."""

    start: int
    hidden: torch.Tensor  # [1, n, hidden_size], the model's dtype; the sender casts for the wire


@dataclass
class EdgeStep:
    """What one edge step produced."""

    position: int  # last input position: the next token is predicted from its hidden state
    uploads: list[Upload]  # new upload-layer rows, in position order
    token: int | None  # the token an exit decided, or None: ask the cloud
    exit: int | None  # the exit (layer count) that decided
    confidence: float | None  # top-1 probability at the deciding exit (None if no head ran)


@dataclass
class _Pending:
    start: int  # first position of the group
    depth: int  # layers the group has been through
    hidden: torch.Tensor  # [1, n, hidden_size] after `depth` layers


class EdgePartition:
    """Runs layers [0, last exit) of one sequence and decides tokens at the exits.

    `last_exit_decides`: the last exit decides whenever no earlier one is confident (the edge
    alone, and the exact mode's drafts); otherwise such a step returns no token (ask the cloud).
    `upload`: collect the upload-layer rows for the cloud."""

    def __init__(self, runner: DecoderRunner, split: Split, heads: HeadSet, threshold: float,
                 last_exit_decides: bool = False, upload: bool = True) -> None:
        assert tuple(heads.exits) == tuple(split.exits), f"heads for {heads.exits}, split at {split.exits}"
        self.runner = runner
        self.split = split
        self.heads = heads
        self.threshold = threshold
        self.last_exit_decides = last_exit_decides
        self.upload = upload
        self.cache = KVCache.for_runner(runner, 0, split.last_exit)
        self.length = 0  # positions seen so far
        self._pending: list[_Pending] = []

    def _may_decide(self, depth: int) -> bool:
        """Whether the head at exit `depth` can decide at all (threshold 1.0 disables exits)."""
        if self.last_exit_decides and depth == self.split.last_exit:
            return True
        return self.threshold < 1.0

    @staticmethod
    def _hold(pending: list[_Pending], start: int, depth: int, hidden: torch.Tensor) -> None:
        """Keep rows [start, ...) that stopped after `depth` layers until a later step carries them."""
        last = pending[-1] if pending else None
        if last is not None and last.depth == depth:
            # [1, n_last + n, hidden]: one group per depth keeps depths strictly falling
            pending[-1] = _Pending(last.start, depth, torch.cat([last.hidden, hidden], dim=1))
        else:
            assert last is None or last.depth > depth, "pending depths must fall with position"
            pending.append(_Pending(start, depth, hidden))

    def step(self, token_ids: list[int], abort: Callable[[], bool] | None = None) -> EdgeStep | None:
        """Feed the next input tokens (the prompt, then one token a step). `abort()` is asked at every
        layer boundary; when it says yes the step stops there and returns None (roll back next)."""
        x = self.runner.embed(torch.tensor([token_ids]))  # [1, T, hidden]
        return self._advance(x, decide=True, abort=abort)

    def flush(self) -> list[Upload]:
        """Carry every pending row through the remaining edge layers without a new token, so the
        cloud gets the upload-layer row of every position seen; the upload rows that crossed."""
        if not self._pending:
            return []
        empty = self.runner.embed.weight.new_zeros(1, 0, self.runner.hidden_size)  # [1, 0, hidden]
        return self._advance(empty, decide=False).uploads

    def _advance(self, x: torch.Tensor, decide: bool, abort=None) -> EdgeStep | None:
        first = self.length
        end = first + x.shape[1]
        pending = list(self._pending)  # committed only when the step completes
        low = pending[0].start if pending else first
        cos, sin = self.runner.rope(low, end, x)  # each [1, end-low, head_dim]
        start = first
        uploads: list[Upload] = []
        for index in range(self.split.last_exit):
            if abort is not None and abort():
                return None
            if pending and pending[-1].depth == index:
                group = pending.pop()
                assert group.start + group.hidden.shape[1] == start, "pending rows must be contiguous"
                x = torch.cat([group.hidden, x], dim=1)  # [1, T', hidden], earlier positions first
                start = group.start
            if x.shape[1] == 0:  # a flush before the deepest pending group joins
                continue
            offset = start - low
            x = self.runner.run_layer(index, x, start, self.cache, (cos[:, offset:], sin[:, offset:]))
            depth = index + 1
            if self.upload and depth == self.split.upload_layer:
                uploads.append(Upload(start, x))
            if decide and depth in self.heads.heads and self._may_decide(depth):
                token, conf = self.heads.heads[depth].top1(x[:, -1:], self.runner.lm_head)
                if self.last_exit_decides and depth == self.split.last_exit or conf >= self.threshold:
                    if depth < self.split.last_exit:
                        self._hold(pending, start, depth, x)
                    self._pending, self.length = pending, end
                    return EdgeStep(end - 1, uploads, token, depth, conf)
        assert not pending, "every pending row reaches the last exit when no exit decides"
        self._pending, self.length = pending, end
        return EdgeStep(end - 1, uploads, None, None, None)

    def rollback(self, length: int) -> None:
        """Forget positions >= `length`: KV of every layer and pending rows, as if only positions
        [0, length) had been fed (their hidden states and KV do not depend on later tokens)."""
        assert length <= self.length, f"roll back to {length}, but only {self.length} positions were fed"
        self.cache.truncate(length)
        kept = []
        for group in self._pending:
            if group.start < length:
                n = min(group.hidden.shape[1], length - group.start)
                kept.append(_Pending(group.start, group.depth, group.hidden[:, :n]))  # [1, n, hidden]
        self._pending = kept
        self.length = length
