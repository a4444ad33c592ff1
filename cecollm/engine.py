"""Greedy generation in one process: the whole model, the edge alone, or edge and cloud.

Modes:
- `cloud`: the whole model, unsplit (the baseline).
- `standalone`: the edge alone; earlier exits decide above the threshold, the last exit always.
- `collab`: an exit decides when its top-1 probability reaches the threshold; otherwise the
  cloud partition decides from the uploaded hidden states. Threshold 1.0 disables exits.
- `exact`: the edge drafts every token (the confident exit's, else the last exit's top-1) and
  goes on; the cloud checks each draft against the full model and a wrong one is rolled back
  on both sides (edge/drafts.py): the output is the full model's at any threshold. In one
  process the cloud checks every `verify_every` steps, the edge's lag behind its drafts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cecollm.cache.kv import KVCache
from cecollm.cloud.partition import CloudPartition
from cecollm.config import GenerationConfig
from cecollm.edge.drafts import DraftBook
from cecollm.edge.heads import HeadSet
from cecollm.edge.partition import EdgePartition
from cecollm.errors import UserError
from cecollm.generation import GenerationResult, GenerationStats, TokenRecord, decode_greedily
from cecollm.layers import DecoderRunner, top1
from cecollm.prompting import eos_ids
from cecollm.split import Split


class SplitEngine:
    """One model, split by `split`, generating greedily in this process."""

    def __init__(self, model: torch.nn.Module, split: Split, heads: HeadSet) -> None:
        self.model = model
        self.split = split
        self.heads = heads
        self.runner = DecoderRunner(model)
        self.eos = eos_ids(model)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        on_token: Callable[[TokenRecord], None] | None = None,
    ) -> GenerationResult:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if config.mode == "exact":
            return self._generate_exact(prompt_ids, config, on_token)
        step = self._whole_model_steps() if config.mode == "cloud" else self._split_steps(config)
        next(step)
        result = GenerationResult([], [], GenerationStats(prompt_tokens=len(prompt_ids)))
        decode_greedily(prompt_ids, config.max_new_tokens, self.eos, lambda ids: step.send((ids, result.stats)),
                        result, on_token)
        step.close()
        return result

    def _generate_exact(self, prompt_ids, config: GenerationConfig, on_token, verify_every: int = 1) -> GenerationResult:
        """Draft with the edge, check with the cloud every `verify_every` edge steps, roll back wrong drafts."""
        edge = EdgePartition(self.runner, self.split, self.heads, config.threshold, last_exit_decides=True)
        cloud = CloudPartition(self.runner, self.split)
        book = DraftBook(len(prompt_ids), config.max_new_tokens, self.eos, on_token)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        inputs, lag = list(prompt_ids), 0
        while not book.done:
            t0 = time.perf_counter()
            waiting = False
            if book.drafting_done:
                uploads = edge.flush()  # the last drafts' rows must reach the cloud
            else:
                out = edge.step(inputs)
                uploads, waiting, lag = out.uploads, out.confidence < config.wait_below, lag + 1
                if not waiting:
                    book.draft(out.token, out.exit, out.confidence)
                    stats.drafts += 1
                    inputs = [out.token]
            stats.edge_seconds += time.perf_counter() - t0
            self._upload(cloud, uploads, config, stats)
            row = cloud.received - 1  # the last row the cloud has
            if not (waiting or book.drafting_done or lag >= verify_every) or row + 1 - len(prompt_ids) < book.confirmed:
                continue  # nothing due, or no unconfirmed draft among the rows the cloud has
            t0 = time.perf_counter()
            checked, token, prob = cloud.verify(row, book.unconfirmed_rows())
            stats.cloud_seconds += time.perf_counter() - t0
            lag = 0
            rollback = book.verdict(checked, token, prob)
            if rollback is not None:
                edge.rollback(rollback)
                stats.rollbacks += 1
            if rollback is not None or waiting:
                inputs = [token]
        result = GenerationResult([r.token_id for r in book.shown], list(book.shown), stats)
        stats.edge_tokens = sum(1 for r in book.shown if r.decided_by != "cloud")
        stats.cloud_tokens = len(book.shown) - stats.edge_tokens
        return result

    def _whole_model_steps(self):
        """Coroutine: receives (input ids, stats), yields (token, "cloud", confidence)."""
        runner = self.runner
        cache = KVCache.for_runner(runner, 0, runner.n_layers)
        length = 0
        reply = None
        while True:
            ids, stats = yield reply
            t0 = time.perf_counter()
            x = runner.embed(torch.tensor([ids]))  # [1, T, hidden]
            rope = runner.rope(length, length + len(ids), x)
            for index in range(runner.n_layers):
                x = runner.run_layer(index, x, length, cache, rope)
            length += len(ids)
            token, conf = top1(runner.logits(x[:, -1:])[0, -1])
            stats.cloud_seconds += time.perf_counter() - t0
            stats.cloud_tokens += 1
            stats.bytes_up += 4 * len(ids)  # the cloud-based deployment receives token ids
            reply = (token, "cloud", conf)

    def _split_steps(self, config: GenerationConfig):
        """Coroutine for `standalone` and `collab`: the edge decides or asks the cloud."""
        standalone = config.mode == "standalone"
        edge = EdgePartition(self.runner, self.split, self.heads, config.threshold, last_exit_decides=standalone,
                             upload=not standalone)
        cloud = None if standalone else CloudPartition(self.runner, self.split)
        reply = None
        while True:
            ids, stats = yield reply
            t0 = time.perf_counter()
            out = edge.step(ids)
            stats.edge_seconds += time.perf_counter() - t0
            if out.token is not None:
                stats.edge_tokens += 1
                reply = (out.token, out.exit, out.confidence)
                if cloud is not None:
                    self._upload(cloud, out.uploads, config, stats)
                continue
            t0 = time.perf_counter()
            self._upload(cloud, out.uploads, config, stats)
            token, conf = cloud.decide(out.position)
            stats.cloud_seconds += time.perf_counter() - t0
            stats.cloud_tokens += 1
            reply = (token, "cloud", conf)

    @staticmethod
    def _upload(cloud: CloudPartition, uploads, config: GenerationConfig, stats: GenerationStats) -> None:
        for up in uploads:
            wire = up.hidden.to(config.wire_dtype(up.hidden.dtype))  # what crosses the network
            stats.bytes_up += wire.numel() * wire.element_size()
            cloud.receive(up.start, wire)
