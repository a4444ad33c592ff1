"""Early-exit heads and the heads file.

An exit head reads the hidden state after `exit` decoder layers and ends in the model's own
LM head (shared, never copied or saved). The default head, before any training, is a copy of
the model's final norm: the "logit lens".

A heads file is safetensors: tensors named `exit{N}.{param}` and metadata recording the
format, the model identity, the exits, the head architecture and the training settings.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cecollm.errors import UserError
from cecollm.layers import top1

HEADS_FORMAT = "cecollm-heads/1"


class ExitHead(torch.nn.Module):
    """Base of exit heads: hidden [1, T, H] -> logits [1, T, vocab] through the shared LM head."""

    arch = "base"

    def forward(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def top1(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> tuple[int, float]:
        """The head's greedy token and its probability for one row, hidden [1, 1, H].

        The edge calls only this, so a head may override it with something cheaper than the
        full-vocabulary logits (a reduced vocabulary with an "other" class, say).
        """
        return top1(self(hidden, lm_head)[0, -1])


class NormHead(ExitHead):
    """RMSNorm, initialised from the model's final norm, then the LM head (the logit lens)."""

    arch = "norm"

    def __init__(self, final_norm: torch.nn.Module) -> None:
        super().__init__()
        self.norm = copy.deepcopy(final_norm)

    def forward(self, hidden, lm_head):
        return lm_head(self.norm(hidden))


def head_architectures() -> dict[str, type[ExitHead]]:
    """Known head architectures by name (heads files name theirs)."""
    return {NormHead.arch: NormHead}


def build_head(arch: str, model: torch.nn.Module, options: dict) -> ExitHead:
    """A fresh head of architecture `arch` for `model`, initialised as the logit lens."""
    archs = head_architectures()
    if arch not in archs:
        raise UserError(f"unknown head architecture {arch!r}; known: {', '.join(sorted(archs))}")
    cls = archs[arch]
    if cls is NormHead:
        return NormHead(model.model.norm)
    return cls(model, **options)


@dataclass
class HeadSet:
    """One head per exit, with what is needed to check it belongs to a model and split."""

    exits: tuple[int, ...]
    heads: dict[int, ExitHead]
    arch: str = NormHead.arch
    arch_options: dict = field(default_factory=dict)  # constructor options of the architecture
    model_identity: str = ""  # identity of the model the heads were trained for ("" = any)
    training: dict = field(default_factory=dict)  # settings and results of the training run

    @classmethod
    def lens(cls, model: torch.nn.Module, exits: tuple[int, ...]) -> "HeadSet":
        """Untrained default: the model's final norm at every exit."""
        return cls(exits=tuple(exits), heads={e: NormHead(model.model.norm) for e in exits})

    def save(self, path: str | Path) -> None:
        tensors = {}
        for e, head in self.heads.items():
            for name, value in head.state_dict().items():
                tensors[f"exit{e}.{name}"] = value.detach().contiguous().cpu()
        metadata = {
            "format": HEADS_FORMAT,
            "model_identity": self.model_identity,
            "exits": json.dumps(list(self.exits)),
            "arch": self.arch,
            "arch_options": json.dumps(self.arch_options),
            "training": json.dumps(self.training),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module, model_identity: str) -> "HeadSet":
        """Load heads for `model`; a file made for another model fails with a UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"heads file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for a bad file
            raise UserError(f"{path} is not a heads file: {exc}") from None
        if meta.get("format") != HEADS_FORMAT:
            raise UserError(f"{path} is not a cecollm heads file (format {meta.get('format')!r})")
        if meta.get("model_identity") and meta["model_identity"] != model_identity:
            raise UserError(
                f"{path} was trained for another model (identity {meta['model_identity'][:12]}, "
                f"this model is {model_identity[:12]})"
            )
        exits = tuple(json.loads(meta["exits"]))
        arch = meta["arch"]
        options = json.loads(meta.get("arch_options") or "{}")
        heads = {}
        for e in exits:
            head = build_head(arch, model, options)
            prefix = f"exit{e}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            missing, unexpected = head.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise UserError(f"{path}: exit {e} does not fit architecture {arch!r} ({missing or unexpected})")
            heads[e] = head.eval()
        training = json.loads(meta.get("training") or "{}")
        return cls(exits, heads, arch, options, meta.get("model_identity", ""), training)
