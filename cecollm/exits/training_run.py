"""`cecollm train-exits` end to end: data, teacher pass (cached), training, measurement, file."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from cecollm.config import cecollm_home
from cecollm.edge.heads import HeadSet
from cecollm.errors import UserError
from cecollm.exits.collect import CacheSpec, collect, file_sources
from cecollm.exits.config import DataConfig, TrainConfig
from cecollm.exits.data import read_examples
from cecollm.exits.measure import measure_heads
from cecollm.exits.train import ExitTrainer
from cecollm.split import Split

log = logging.getLogger(__name__)


def _cache(loaded, paths, part: str, cfg: DataConfig, layers, max_tokens: int, name: str):
    examples = read_examples(paths, part, cfg.holdout)
    if not examples:
        return None, 0
    spec = CacheSpec(loaded.identity, file_sources(paths), cfg.holdout, part, cfg.max_len, cfg.top_k, max_tokens)
    root = Path(cfg.cache) if cfg.cache else cecollm_home() / "exit-cache"
    cache_dir = root / f"{name}-{spec.key()}"
    log.info("%s text: %d records from %s; cache %s", name, len(examples), ", ".join(map(str, paths)), cache_dir)
    return collect(loaded.model, loaded.tokenizer, examples, tuple(layers), spec, cache_dir), len(examples)


def train_exits(loaded, exits: tuple[int, ...], data: DataConfig, config: TrainConfig, out: Path,
                resume: bool = True, half: bool = False, progress: bool = True, command: str = "") -> HeadSet:
    """Train heads for `exits` of `loaded` and write them to `out`; returns the HeadSet.

    `command` is recorded in the heads file (the CLI passes its command line)."""
    split = Split.create(loaded.n_layers, exits)  # validates the exits against the model
    layers = sorted(set(split.exits) | set(data.cache_layers))
    if any(not 1 <= e < loaded.n_layers for e in layers):
        raise UserError(f"--cache-layers must be in 1..{loaded.n_layers - 1}")
    train_cache, n_train = _cache(loaded, data.data, "train", data, layers, data.max_tokens, "train")
    if train_cache is None:
        raise UserError("the data files hold no training text")
    eval_caches = []
    held, n_held = _cache(loaded, data.data, "heldout", data, layers, 0, "heldout")
    if held is not None:
        eval_caches.append(("heldout", held))
    if data.eval_data:
        extra, _ = _cache(loaded, data.eval_data, "train", data, layers, 0, "eval")
        if extra is not None:
            eval_caches.append(("eval-data", extra))
    trainer = ExitTrainer(loaded.model, split.exits, train_cache, config, checkpoint=Path(str(out) + ".ckpt"))
    if resume:
        trainer.resume()
    summary = trainer.train(progress)
    results = {}
    for name, cache in eval_caches:
        results[name] = measure_heads(trainer.heads, cache, loaded.model.lm_head)
    heads = HeadSet(
        exits=split.exits, heads=trainer.heads, arch=config.arch, arch_options=dict(config.arch_options),
        model_identity=loaded.identity,
        training={
            "command": command,
            "model": loaded.name, "config": asdict(config),
            "data": {**{k: v for k, v in asdict(data).items() if k != "cache"},
                     "train_records": n_train, "train_rows": train_cache.rows, "heldout_records": n_held,
                     "held_out": f"the last {data.holdout} records of each Alpaca-format file"},
            "summary": summary, "evaluation": results, "torch": torch.__version__,
        },
    )
    heads.save(out, torch.float16 if half else None)
    if summary["complete"]:
        Path(str(out) + ".ckpt").unlink(missing_ok=True)
    return heads
