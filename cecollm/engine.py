"""Greedy generation in one process: the whole model, the edge alone, or edge and cloud.

Modes:
- `cloud`: the whole model, unsplit (the baseline).
- `standalone`: the edge alone; earlier exits decide above the threshold, the last exit always.
- `collab`: an exit decides when its top-1 probability reaches the threshold; otherwise the
  cloud partition decides from the uploaded hidden states. Threshold 1.0 disables exits.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cecollm.cache.kv import KVCache
from cecollm.cloud.partition import CloudPartition
from cecollm.config import GenerationConfig
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
        step = self._whole_model_steps() if config.mode == "cloud" else self._split_steps(config)
        next(step)
        result = GenerationResult([], [], GenerationStats(prompt_tokens=len(prompt_ids)))
        decode_greedily(prompt_ids, config.max_new_tokens, self.eos, lambda ids: step.send((ids, result.stats)),
                        result, on_token)
        step.close()
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
        edge = EdgePartition(self.runner, self.split, self.heads, config.threshold, standalone)
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
            wire = up.hidden.to(config.wire_dtype)  # what crosses the network
            stats.bytes_up += wire.numel() * wire.element_size()
            cloud.receive(up.start, wire)
