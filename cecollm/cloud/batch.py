"""Several devices' requests in one pass through the cloud layers and one LM head pass.

Each request brings the rows its device uploaded since its last request ([folded, position]) and
its KV cache (where it lives: a device's shared-memory segment, or a remote grant's copy). The
rows of the requests of a pass go through a layer's row-wise parts (norm, projections, MLP)
together, and through attention one request at a time, each over its own KV. The LM head reads its weights once
for the rows of the whole batch: on a small model that read is most of a token's cost.

A batch of one computes exactly what the unbatched path (CloudPartition) computes; a batch computes
in passes of at most ROWS_PER_PASS rows (see there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cecollm.cache.kv import KVCache
from cecollm.layers import DecoderRunner
from cecollm.split import Split

# Matrix products on CPU (oneDNN's bfloat16 kernels, measured on AVX512-BF16) give each row the same bits
# whether it is computed alone or among up to 32 rows; beyond 32 rows F.linear picks another kernel, which
# rounds otherwise. A batch therefore goes through the layers in passes of at most this many rows: requests
# packed in order, a request of more rows alone (as it would be unbatched). With the weights packed
# (packing.py: every row one row's bits however many) and rows that continue a sequence attending row by row
# (layers.DecoderRunner.attend), each request's tokens are those it gets served alone, bit for bit in
# bfloat16. (Before rows attended row by row, requests of several rows packed with others gave 5 and 10 of
# 2400 and 8100 bfloat16 tokens other than unbatched serving; float32's small-row kernels round rows apart
# in the last bits, which the tokens survived: 0 mismatches there.)
ROWS_PER_PASS = 32


@dataclass
class Fold:
    """One request of a batch: rows [folded, position] to fold into its KV, then a decision."""

    cache: KVCache  # holds positions [0, folded) at every cloud layer; the fold appends the rest
    rows: torch.Tensor  # [1, n, hidden], any float dtype: the upload-layer rows [folded, folded + n)
    folded: int
    drafts: dict[int, int] | None = None  # verify: the edge's token after row r (rows without one: absent)

    @property
    def position(self) -> int:
        return self.folded + self.rows.shape[1] - 1

    def checked_rows(self) -> list[int]:
        """The rows whose next token the batch decides: a decision only the last; a verification every
        row with a draft, then the last (prompt rows have no draft)."""
        if self.drafts is None:
            return [self.position]
        return [r for r in range(self.folded, self.position) if r in self.drafts] + [self.position]


@dataclass(frozen=True)
class Verdict:
    """A request's answer: the token after `row` (a verification: the first row whose draft was wrong, else
    the last) and its probability."""

    row: int
    token: int
    prob: float

    def rolls_back(self, fold: Fold) -> bool:
        """Whether the edge's draft after `row` was wrong (the session goes back to row + 1 positions)."""
        return fold.drafts is not None and fold.drafts.get(self.row, self.token) != self.token


def judge(logits: torch.Tensor, rows: list[int], drafts: dict[int, int] | None) -> Verdict:
    """The verdict over logits [len(rows), vocab] of `rows`: the first row whose draft the greedy token
    contradicts, else the last row, with the greedy token (argmax, as transformers' greedy search)."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, (row, token) in enumerate(zip(rows, tokens)):
        draft = None if drafts is None else drafts.get(row)
        if draft is not None and draft != token or i == len(rows) - 1:
            return Verdict(row, token, float(torch.softmax(logits[i].float(), dim=-1)[token]))
    raise AssertionError("the loop returns at the last row")


def passes(folds: list[Fold]) -> list[list[int]]:
    """The batch's passes (indices into `folds`): requests packed together in order, at most ROWS_PER_PASS rows
    a pass; a request with more rows alone."""
    groups: list[list[int]] = []
    rows = ROWS_PER_PASS
    for i, fold in enumerate(folds):
        n = fold.rows.shape[1]
        if rows + n > ROWS_PER_PASS:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += n
    return groups


class BatchFolder:
    """Runs batches of Folds through layers [upload layer, n_layers) and the LM head."""

    def __init__(self, runner: DecoderRunner, split: Split) -> None:
        self.runner = runner
        self.split = split

    @torch.inference_mode()
    def run(self, folds: list[Fold]) -> list[Verdict]:
        """Fold every request's rows into its KV and judge it; one verdict a fold, in order."""
        assert folds, "a batch has at least one request"
        verdicts: list[Verdict | None] = [None] * len(folds)
        for group in passes(folds):
            for i, verdict in zip(group, self._run([folds[i] for i in group])):
                verdicts[i] = verdict
        return verdicts

    def _run(self, folds: list[Fold]) -> list[Verdict]:
        """One pass: the folds' rows through the cloud layers together, then the LM head."""
        runner = self.runner
        dtype = runner.embed.weight.dtype
        sizes = [f.rows.shape[1] for f in folds]
        x = torch.cat([f.rows.to(dtype) for f in folds], dim=1)  # [1, N, hidden], N = sum of sizes
        positions = torch.cat([torch.arange(f.folded, f.folded + n) for f, n in zip(folds, sizes)])
        rope = runner.rope_at(positions.unsqueeze(0), x)  # each [1, N, head_dim]
        for index in range(self.split.upload_layer, self.split.n_layers):
            q, k, v = runner.project(index, x, rope)  # q [1, heads, N, hd], k and v [1, kv heads, N, hd]
            parts, begin = [], 0
            for fold, n in zip(folds, sizes):
                end = begin + n
                keys, values = fold.cache.append(index, fold.folded, k[:, :, begin:end], v[:, :, begin:end])
                parts.append(runner.attend(index, q[:, :, begin:end], keys, values, fold.folded))  # [1, n, h*hd]
                begin = end
            x = runner.finish(index, x, parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))  # [1, N, hidden]
        picks, offsets, begin = [], [], 0
        for fold, n in zip(folds, sizes):
            rows = fold.checked_rows()
            picks.extend(begin + r - fold.folded for r in rows)
            offsets.append((len(picks) - len(rows), rows))
            begin += n
        logits = runner.logits(x[:, picks])[0]  # [checked rows of the batch, vocab], float32
        return [judge(logits[at:at + len(rows)], rows, fold.drafts) for fold, (at, rows) in zip(folds, offsets)]
