"""One frozen forward pass over the training text: exit hidden states and the teacher's top-k.

The cache is a directory of shards (torch files) plus `manifest.json`. A shard holds whole
sequences: the hidden states after each cached layer ([rows, hidden], float16), the final
layer's top-k next-token probabilities ([rows, k]), the sequence offsets, and which rows are
trained (the fixed template start is not). Collection resumes after the last finished shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cecollm.errors import UserError
from cecollm.exits.data import ChatEncoder, Example

CACHE_FORMAT = "cecollm-exit-cache/1"


@dataclass(frozen=True)
class CacheSpec:
    """What a cache was made from; a cache is reused only when this matches."""

    model_identity: str  # the teacher model (cecollm.loading.model_identity)
    sources: tuple[str, ...]  # data file names, sizes and content digests (see file_sources)
    holdout: int  # Alpaca records held out at the end of each Alpaca file
    part: str  # train | heldout
    max_len: int  # tokens per sequence at most
    top_k: int  # teacher probabilities kept per row
    max_tokens: int  # token budget of the collection (0 = all)

    def key(self) -> str:
        return hashlib.blake2b(json.dumps(asdict(self), sort_keys=True).encode(), digest_size=8).hexdigest()


def file_sources(paths) -> tuple[str, ...]:
    """Each data file as name:size:content digest, so an edited file (even one of the same size) is new data."""
    out = []
    for p in paths:
        digest, size = hashlib.blake2b(digest_size=8), 0
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
        out.append(f"{Path(p).name}:{size}:{digest.hexdigest()}")
    return tuple(out)


@dataclass
class ExitCache:
    """A loaded cache: all shards concatenated."""

    layers: tuple[int, ...]
    hidden: dict[int, torch.Tensor]  # layer -> [rows, hidden] float16
    top_idx: torch.Tensor  # [rows, k] int64, the teacher's most likely tokens, best first
    top_p: torch.Tensor  # [rows, k] float32, their probabilities
    offsets: torch.Tensor  # [sequences + 1] int64, row ranges of the sequences
    train: torch.Tensor  # [rows] bool, rows that count in the loss
    answer: torch.Tensor  # [rows] bool, rows that predict answer tokens (what generation decides)

    @property
    def rows(self) -> int:
        return int(self.top_idx.shape[0])

    def sequences(self) -> list[tuple[int, int]]:
        o = self.offsets.tolist()
        return list(zip(o[:-1], o[1:]))


def _manifest(path: Path) -> dict | None:
    m = path / "manifest.json"
    return json.loads(m.read_text()) if m.is_file() else None


def collect(model, tokenizer, examples: list[Example], layers: tuple[int, ...], spec: CacheSpec,
            cache_dir: Path, shard_tokens: int = 16384) -> ExitCache:
    """Fill `cache_dir` (resuming a partial one) and return the cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(cache_dir)
    if manifest is not None:
        if manifest.get("format") != CACHE_FORMAT or manifest.get("spec") != asdict(spec) | {"sources": list(spec.sources)}:
            raise UserError(f"{cache_dir} holds a cache made from other settings; remove it or pick another --cache")
        if not set(layers) <= set(manifest["layers"]):
            raise UserError(f"{cache_dir} holds layers {manifest['layers']}, not all of {list(layers)}; use another --cache")
        layers = tuple(manifest["layers"])
    else:
        manifest = {"format": CACHE_FORMAT, "spec": asdict(spec) | {"sources": list(spec.sources)},
                    "layers": list(layers), "shards": [], "examples_done": 0, "tokens": 0, "complete": False}
    if not manifest["complete"]:
        _fill(model, tokenizer, examples, layers, spec, cache_dir, manifest, shard_tokens)
    return load_cache(cache_dir, layers)


@torch.inference_mode()
def _fill(model, tokenizer, examples, layers, spec, cache_dir, manifest, shard_tokens) -> None:
    encoder = ChatEncoder(tokenizer)
    lm_head, inner = model.lm_head, model.model
    budget = spec.max_tokens or float("inf")
    bar = tqdm(total=None if budget == float("inf") else int(budget), initial=manifest["tokens"],
               desc="teacher pass", unit="tok")
    buf = _ShardBuffer(layers)
    i = manifest["examples_done"]
    while i < len(examples) and manifest["tokens"] + buf.rows < budget:
        ids, first, answer = encoder.encode_parts(examples[i], spec.max_len)
        i += 1
        if len(ids) < 2 or first >= len(ids):
            continue
        out = inner(torch.tensor([ids]), output_hidden_states=True)
        logp = torch.log_softmax(lm_head(out.last_hidden_state[0]).float(), dim=-1)  # [T, vocab]
        top_p, top_idx = logp.topk(spec.top_k, dim=-1)
        # hidden_states[e] is the residual stream after e decoder layers ([1, T, hidden]).
        buf.add({e: out.hidden_states[e][0] for e in layers}, top_idx, top_p.exp(), first, answer)
        bar.update(len(ids))
        if buf.rows >= shard_tokens:
            buf.flush(cache_dir, manifest, i)
            buf = _ShardBuffer(layers)
    if buf.rows:
        buf.flush(cache_dir, manifest, i)
    manifest["complete"] = True
    manifest["examples_done"] = i
    _write_manifest(cache_dir, manifest)
    bar.close()


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    tmp = cache_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(cache_dir / "manifest.json")


class _ShardBuffer:
    def __init__(self, layers) -> None:
        self.layers = layers
        self.hidden = {e: [] for e in layers}
        self.idx, self.p, self.lengths, self.train, self.answer = [], [], [], [], []
        self.rows = 0

    def add(self, hidden: dict, top_idx, top_p, first: int, answer: int) -> None:
        t = top_idx.shape[0]
        for e in self.layers:
            self.hidden[e].append(hidden[e].to(torch.float16))
        self.idx.append(top_idx.to(torch.int32))
        self.p.append(top_p.to(torch.float32))
        self.lengths.append(t)
        mask = torch.zeros(t, dtype=torch.bool)
        mask[first:] = True
        self.train.append(mask)
        # Row t predicts token t+1: the first answer token is predicted from row answer-1.
        answer_mask = torch.zeros(t, dtype=torch.bool)
        answer_mask[max(answer - 1, first):] = True
        self.answer.append(answer_mask)
        self.rows += t

    def flush(self, cache_dir: Path, manifest: dict, examples_done: int) -> None:
        name = f"shard-{len(manifest['shards']):05d}.pt"
        torch.save({
            "hidden": {e: torch.cat(v) for e, v in self.hidden.items()},
            "top_idx": torch.cat(self.idx), "top_p": torch.cat(self.p),
            "lengths": torch.tensor(self.lengths), "train": torch.cat(self.train),
            "answer": torch.cat(self.answer),
        }, cache_dir / name)
        manifest["shards"].append(name)
        manifest["examples_done"] = examples_done
        manifest["tokens"] += self.rows
        _write_manifest(cache_dir, manifest)


def load_cache(cache_dir: Path, layers: tuple[int, ...] | None = None) -> ExitCache:
    manifest = _manifest(cache_dir)
    if manifest is None or not manifest["shards"]:
        raise UserError(f"{cache_dir} holds no cached text (no usable training text?)")
    layers = tuple(layers or manifest["layers"])
    if not set(layers) <= set(manifest["layers"]):
        raise UserError(f"{cache_dir} holds layers {manifest['layers']}, not all of {list(layers)}")
    parts = [torch.load(cache_dir / s, weights_only=True) for s in manifest["shards"]]
    lengths = torch.cat([p["lengths"] for p in parts])
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return ExitCache(
        layers=layers,
        hidden={e: torch.cat([p["hidden"][e] for p in parts]) for e in layers},
        top_idx=torch.cat([p["top_idx"] for p in parts]).long(),
        top_p=torch.cat([p["top_p"] for p in parts]),
        offsets=offsets,
        train=torch.cat([p["train"] for p in parts]),
        # Caches written before answers were marked: every trained row counts as an answer row.
        answer=torch.cat([p.get("answer", p["train"]) for p in parts]),
    )
