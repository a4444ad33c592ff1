"""The edge partition: embeddings, decoder layers up to the last exit, exit heads.

Exact KV with early exits. When a position exits at layer e, the layers at and above e have
no KV for it yet. Its hidden state after e layers is kept as a pending row; the next step
prepends it to the new rows when the layer loop reaches e, so it runs through the missing
layers with the real hidden states, exactly as the full model would. Pending groups are
contiguous, ordered by position, and their depths fall strictly with position, so at layer
`i` the only group that can join is the last one.
"""

from __future__ import annotations

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
    """Runs layers [0, last exit) of one sequence and decides tokens at the exits."""

    def __init__(
        self,
        runner: DecoderRunner,
        split: Split,
        heads: HeadSet,
        threshold: float,
        standalone: bool = False,
        upload: bool = True,
    ) -> None:
        assert tuple(heads.exits) == tuple(split.exits), f"heads for {heads.exits}, split at {split.exits}"
        self.runner = runner
        self.split = split
        self.heads = heads
        self.threshold = threshold
        self.standalone = standalone
        self.upload = upload and not standalone
        self.cache = KVCache.for_runner(runner, 0, split.last_exit)
        self.length = 0  # positions seen so far
        self._pending: list[_Pending] = []

    def _may_decide(self, depth: int) -> bool:
        """Whether the head at exit `depth` can decide at all (threshold 1.0 disables exits)."""
        if self.standalone and depth == self.split.last_exit:
            return True
        return self.threshold < 1.0

    def _hold(self, start: int, depth: int, hidden: torch.Tensor) -> None:
        """Keep rows [start, ...) that stopped after `depth` layers until a later step carries them."""
        last = self._pending[-1] if self._pending else None
        if last is not None and last.depth == depth:
            # [1, n_last + n, hidden]: one group per depth keeps depths strictly falling
            self._pending[-1] = _Pending(last.start, depth, torch.cat([last.hidden, hidden], dim=1))
        else:
            assert last is None or last.depth > depth, "pending depths must fall with position"
            self._pending.append(_Pending(start, depth, hidden))

    def step(self, token_ids: list[int]) -> EdgeStep:
        """Feed the next input tokens (the prompt, then one token a step)."""
        first = self.length
        end = first + len(token_ids)
        x = self.runner.embed(torch.tensor([token_ids]))  # [1, T, hidden]
        start = first
        low = self._pending[0].start if self._pending else first
        cos, sin = self.runner.rope(low, end, x)  # each [1, end-low, head_dim]
        uploads: list[Upload] = []
        for index in range(self.split.last_exit):
            if self._pending and self._pending[-1].depth == index:
                group = self._pending.pop()
                assert group.start + group.hidden.shape[1] == start, "pending rows must be contiguous"
                x = torch.cat([group.hidden, x], dim=1)  # [1, T', hidden], earlier positions first
                start = group.start
            offset = start - low
            x = self.runner.run_layer(index, x, start, self.cache, (cos[:, offset:], sin[:, offset:]))
            depth = index + 1
            if self.upload and depth == self.split.upload_layer:
                uploads.append(Upload(start, x))
            if depth in self.heads.heads and self._may_decide(depth):
                token, conf = self.heads.heads[depth].top1(x[:, -1:], self.runner.lm_head)
                if self.standalone and depth == self.split.last_exit or conf >= self.threshold:
                    if depth < self.split.last_exit:
                        self._hold(start, depth, x)
                    self.length = end
                    return EdgeStep(end - 1, uploads, token, depth, conf)
        assert not self._pending, "every pending row reaches the last exit when no exit decides"
        self.length = end
        return EdgeStep(end - 1, uploads, None, None, None)
