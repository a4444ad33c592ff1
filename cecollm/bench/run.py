"""`cecollm bench`: run every (dataset, prompt, strategy) not yet in results/<run>/raw, then report.

Prompts run in order and, for each prompt, every strategy in turn, so that slow drift in the
machine's load spreads over all strategies alike. Each strategy keeps one edge (one connection
through the link) for the whole run; a short warm-up generation per strategy is not recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from cecollm.bench.config import BenchConfig, Strategy
from cecollm.bench.data import Prompt, dataset_path, read_prompts
from cecollm.bench.store import RawStore
from cecollm.errors import CecollmError, UserError

log = logging.getLogger(__name__)
PROMPT_FORMAT = 1  # bump when data.py builds prompts differently (results are not comparable then)
BROKER_CAPACITY = 1024  # positions per device session: prompts are chosen to fit, and the broker is told so


def heads_digest(heads) -> str:
    """A short hash of the exit heads' weights (trained heads differ from logit-lens ones)."""
    h = hashlib.sha1()
    for exit_layer in sorted(heads.heads):
        for name, tensor in sorted(heads.heads[exit_layer].state_dict().items()):
            h.update(f"{exit_layer}/{name}".encode())
            h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def prompt_digest(prompt: Prompt) -> str:
    """A short hash of a prompt's text and references: the same index in another file is another prompt."""
    return hashlib.sha1(json.dumps([prompt.text, list(prompt.references)]).encode()).hexdigest()[:16]


def check_same_prompts(prompts: dict, done: dict) -> None:
    """Refuse to resume onto results made from other prompts (e.g. another --data file)."""
    for dataset, picked in prompts.items():
        for prompt, _ in picked:
            digest = prompt_digest(prompt)
            for (d, name, index), rec in done.items():
                if d == dataset and index == prompt.index and rec.get("prompt_sha", digest) != digest:
                    raise UserError(f"results for {dataset} prompt {index} ({name}) were made from another "
                                    f"prompt text (another data file?); give another --out")


def select_prompts(config: BenchConfig, tokenizer, max_positions: int) -> tuple[dict[str, list], dict[str, int]]:
    """The first --n prompts of each dataset that fit (prompt + max_new_tokens positions); skips counted."""
    from cecollm.prompting import encode_prompt

    chosen: dict[str, list[tuple[Prompt, list[int]]]] = {}
    skipped: dict[str, int] = {}
    for dataset in config.datasets:
        picked, skip = [], 0
        for prompt in read_prompts(dataset, dataset_path(dataset, config.data_dir, config.data_files)):
            ids = encode_prompt(tokenizer, prompt.text)
            if len(ids) + config.max_new_tokens > max_positions:
                skip += 1
                continue
            picked.append((prompt, ids))
            if len(picked) == config.n:
                break
        if len(picked) < config.n:
            log.warning("%s: only %d prompts fit in %d positions (asked for %d)", dataset, len(picked),
                        max_positions, config.n)
        chosen[dataset], skipped[dataset] = picked, skip
    return chosen, skipped


class EdgeSet:
    """One edge per strategy, made on first use and kept for the run."""

    def __init__(self, loaded, split, heads, config: BenchConfig, cloud) -> None:
        self.loaded, self.split, self.heads, self.config, self.cloud = loaded, split, heads, config, cloud
        self._edges: dict[str, object] = {}
        self._context = None

    def get(self, strategy: Strategy):
        if strategy.name not in self._edges:
            self._edges[strategy.name] = self._make(strategy, len(self._edges))
        return self._edges[strategy.name]

    def _make(self, s: Strategy, number: int):
        import zmq

        from cecollm.bench.baselines.edge import CloudBasedEdge, FullUploadEdge
        from cecollm.edge.client import EdgeClient, EdgeConfig

        c, a = self.config, self.cloud.addresses
        self._context = self._context or zmq.Context()
        keys = self.cloud.device_keys
        if s.kind == "cloud":
            return CloudBasedEdge(a.baseline, c.max_new_tokens, c.timeout, self._context, keys)
        if s.kind == "full":
            return FullUploadEdge(self.loaded.model, self.split, self.heads, a.baseline, s.threshold, s.fp16,
                                  c.max_new_tokens, c.timeout, self._context, keys)
        # without a broker (standalone only) the edge never connects; the addresses are placeholders
        edge_config = EdgeConfig(device_id=100 + number, broker=a.broker or "tcp://127.0.0.1:9",
                                 upload=a.upload or "tcp://127.0.0.1:10", shm=False, threshold=s.threshold,
                                 standalone=s.standalone, exact=s.exact, fp16=s.fp16, max_new_tokens=c.max_new_tokens,
                                 timeout=c.timeout, hello_timeout=c.timeout, max_timeouts=1,
                                 keys=self.cloud.device_bundle)
        return EdgeClient(self.loaded.model, self.loaded.identity, self.split, self.heads, edge_config, self._context)

    def close(self) -> None:
        for edge in self._edges.values():
            edge.close()
        self._edges.clear()
        if self._context is not None:
            self._context.term()
            self._context = None


def run_one(edge, cloud, strategy: Strategy, prompt: Prompt, ids: list[int], tokenizer) -> dict:
    """Generate once and return the raw record (timings, bytes on the wire, output)."""
    cloud.reset_link()
    t0 = time.perf_counter()
    result = edge.generate(ids)
    total = time.perf_counter() - t0
    wire_up, wire_down, wire_s = cloud.wire_bytes()
    s = result.stats
    problems = []
    if getattr(s, "timeouts", 0) or (s.fallback_tokens and not strategy.standalone):
        problems.append(f"{s.timeouts} timeouts, {s.fallback_tokens} tokens decided at the last exit instead")
    if s.standalone_reason and not strategy.standalone:
        problems.append(f"went on alone: {s.standalone_reason}")
    return {
        "dataset": prompt.dataset, "strategy": strategy.name, "index": prompt.index,
        "prompt_sha": prompt_digest(prompt),
        "prompt_tokens": len(ids), "token_ids": result.token_ids,
        "text": tokenizer.decode(result.token_ids, skip_special_tokens=True),
        "decided_by": [t.decided_by for t in result.tokens],
        "total_s": total, "edge_s": s.edge_seconds, "cloud_s": s.cloud_seconds, "comm_s": s.comm_seconds,
        "wire_s": wire_s,
        "cloud_requests": s.cloud_tokens, "edge_tokens": s.edge_tokens, "fallback_tokens": s.fallback_tokens,
        "wire_up": wire_up, "wire_down": wire_down, "app_up": s.bytes_up, "app_down": s.bytes_down,
        "problems": problems, "load_1m": os.getloadavg()[0],
        **({"drafts": s.drafts, "rollbacks": s.rollbacks, "verifies": s.verifies, "verify_s": s.verify_seconds,
            "waiting_s": s.waiting_seconds, "wasted_s": s.wasted_seconds} if strategy.exact else {}),
    }


def run_bench(config: BenchConfig, progress: bool = True) -> Path:
    """Run what is missing, then write results.json, report.md and the plots; the results directory."""
    import torch

    from cecollm.bench.cloudside import CloudSide, plan_cores
    from cecollm.bench.config import BY_NAME
    from cecollm.bench.report import write_outputs
    from cecollm.bench.scaling import run_scaling, scaling_todo
    from cecollm.edge.heads import edge_setup
    from cecollm.linkem import resolve_profile
    from cecollm.spec import ModelSpec

    torch.set_num_threads(config.threads)
    profile = resolve_profile(config.link)
    spec = ModelSpec.from_options(config.model, config.exits, heads=config.heads)
    loaded = spec.load()
    split, heads = edge_setup(spec, loaded)
    max_positions = min(BROKER_CAPACITY, getattr(loaded.model.config, "max_position_embeddings", BROKER_CAPACITY))
    store = RawStore(config.out_dir)
    settings = {"model": config.model, "identity": loaded.identity, "split": split.describe(),
                "heads": heads_digest(heads), "link": profile.describe(), "max_new_tokens": config.max_new_tokens,
                "threads": config.threads, "pin": config.pin, "prompt_format": PROMPT_FORMAT}
    store.check_settings(settings)
    prompts, skipped = select_prompts(config, loaded.tokenizer, max_positions)
    done = store.load()
    check_same_prompts(prompts, done)
    todo = [(s, p, ids) for dataset, picked in prompts.items() for p, ids in picked
            for s in config.strategies_for(dataset) if (dataset, s.name, p.index) not in done]
    plan = plan_cores(config.pin)
    scaling = scaling_todo(config)
    log.info("%s; %d results on file, %d to run, %d scaling points to run", plan.note, len(done), len(todo),
             len(scaling))
    if todo or scaling:
        kinds = {s.kind for s, _, _ in todo} | ({"cloud"} if any(k == "cloud" for _, k, _ in scaling) else set())
        broker = (any(s.kind == "ce" and not s.standalone for s, _, _ in todo)
                  or any(k != "cloud" for _, k, _ in scaling))
        with CloudSide(config.model, config.exits, config.heads, config.threads, profile, plan,
                       Path(config.out_dir) / "raw" / "logs", broker=broker,  # raw/ is not committed
                       baseline=bool(kinds & {"cloud", "full"}),
                       broker_extra=["--capacity", str(BROKER_CAPACITY)]) as cloud:
            if todo:
                _run_todo(config, todo, cloud, loaded, split, heads, store, progress)
            if scaling:
                run_scaling(config, cloud, prompts, progress)
    model = loaded.model
    split_info = {"n_layers": split.n_layers, "exits": list(split.exits), "upload_layer": split.upload_layer,
                  "layer_params": sum(p.numel() for p in model.model.layers[0].parameters()),
                  "lm_head_params": model.lm_head.weight.numel()}
    meta = {"settings": settings, "split": split_info, "config": asdict(config), "cores": plan.note,
            "cpu_count": os.cpu_count(), "link_up_mbit": profile.up.bandwidth_mbit,
            "skipped_too_long": skipped, "strategies": {n: asdict(BY_NAME[n]) for n in config.strategies}}
    return write_outputs(config, prompts, store.load(), meta)


def _run_todo(config, todo, cloud, loaded, split, heads, store, progress: bool) -> None:
    from tqdm import tqdm

    edges = EdgeSet(loaded, split, heads, config, cloud)
    try:
        _warm_up(edges, {s.name: s for s, _, _ in todo}.values(), todo[0][2])
        bar = tqdm(todo, desc="bench", unit="gen", disable=not progress, dynamic_ncols=True)
        for strategy, prompt, ids in bar:
            bar.set_postfix_str(f"{prompt.dataset}#{prompt.index} {strategy.name}")
            record = run_one(edges.get(strategy), cloud, strategy, prompt, ids, loaded.tokenizer)
            if record["problems"]:
                log.warning("%s %s#%d: %s", strategy.name, prompt.dataset, prompt.index,
                            "; ".join(record["problems"]))
            store.append(record)
    except CecollmError as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"the run stopped: {exc} (finished results are kept; rerun to go on)") from None
    finally:
        edges.close()


def _warm_up(edges: EdgeSet, strategies, ids: list[int]) -> None:
    """Two tokens per strategy (connections, caches, first-call costs), not recorded."""
    from dataclasses import replace

    for strategy in strategies:
        edge = edges.get(strategy)
        if hasattr(edge, "config"):  # EdgeClient: swap in a config with a short budget, then put it back
            saved, edge.config = edge.config, replace(edge.config, max_new_tokens=2)
            try:
                edge.generate(ids[:8])
            finally:
                edge.config = saved
            continue
        saved, edge.max_new_tokens = edge.max_new_tokens, 2
        try:
            edge.generate(ids[:8])
        finally:
            edge.max_new_tokens = saved
