"""Early-exit heads and the heads file.

An exit head reads the hidden state after `exit` decoder layers and ends in the model's own
LM head (shared, never copied or saved). The default head, before any training, is a copy of
the model's final norm: the "logit lens".

A heads file is safetensors (its format and metadata: spec.py): tensors named `exit{N}.{param}`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cecollm.errors import UserError
from cecollm.layers import top1
from cecollm.packing import matrix_rows, pack_matrix, unpacked_copy
from cecollm.spec import HEADS_FORMAT, ModelSpec, Resolved, read_heads_meta
from cecollm.split import Split


class ExitHead(torch.nn.Module):
    """Base of exit heads: hidden [1, T, H] -> logits [1, T, vocab] through the shared LM head."""

    arch = "base"
    positionwise = True  # rows are independent: a head may see rows of several sequences at once

    def forward(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def top1(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> tuple[int, float]:
        """The head's greedy token and its probability for one row, hidden [1, 1, H].

        The edge calls only this, so a head may override it with something cheaper than the
        full-vocabulary logits (a reduced vocabulary with an "other" class, say).
        """
        return top1(self(hidden, lm_head)[0, -1])

    def class_logits(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        """Logits over the head's output classes (the full vocabulary unless a head reduces it)."""
        return self(hidden, lm_head)


class NormHead(ExitHead):
    """RMSNorm, initialised from the model's final norm, then the LM head (the logit lens)."""

    arch = "norm"

    def __init__(self, final_norm: torch.nn.Module) -> None:
        super().__init__()
        self.norm = copy.deepcopy(final_norm)

    def forward(self, hidden, lm_head):
        return lm_head(self.norm(hidden))


class AdapterHead(ExitHead):
    """Optional low-rank residual adapter, the final norm, then the LM head or a reduced vocabulary.

    x -> x + up(silu(down(norm_in(x)))) -> norm -> logits. `up` starts at zero, so an untrained
    adapter head is the logit lens. With `vocab` > 0 the head scores only `vocab` frequent tokens
    (rows of the shared LM head, chosen from training data and saved as `token_ids`) plus an
    "other" class: when "other" is the most likely class the head defers (see `top1`). Its cost
    is then about vocab/49152 of the full LM head's.
    """

    arch = "adapter"

    def __init__(self, model: torch.nn.Module, rank: int = 64, vocab: int = 0) -> None:
        super().__init__()
        hidden = model.config.hidden_size
        self.rank = rank
        self.vocab = vocab
        if rank:
            self.norm_in = copy.deepcopy(model.model.norm)
            self.down = torch.nn.Linear(hidden, rank, bias=False)
            self.up = torch.nn.Linear(rank, hidden, bias=False)
            torch.nn.init.normal_(self.down.weight, std=hidden ** -0.5)
            torch.nn.init.zeros_(self.up.weight)
        self.norm = copy.deepcopy(model.model.norm)
        if vocab:
            if vocab >= model.config.vocab_size:
                raise UserError(f"a reduced vocabulary of {vocab} is not smaller than the model's {model.config.vocab_size}")
            self.register_buffer("token_ids", torch.arange(vocab, dtype=torch.int64))  # set by set_tokens()
            self.other = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(self.other.weight)
            torch.nn.init.constant_(self.other.bias, 0.0)
            self._rows = None  # cached LM head rows of token_ids: [vocab, hidden]

    def set_tokens(self, token_ids: torch.Tensor) -> None:
        """Choose the reduced vocabulary (token ids, most frequent first)."""
        assert token_ids.numel() == self.vocab, f"need {self.vocab} token ids, got {token_ids.numel()}"
        self.token_ids.copy_(token_ids.to(torch.int64))
        self._rows = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._rows = None
        super()._load_from_state_dict(*args, **kwargs)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rank:
            hidden = hidden + self.up(torch.nn.functional.silu(self.down(self.norm_in(hidden))))
        return self.norm(hidden)

    def class_logits(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        """Logits over the head's classes: [..., vocab] for a full vocabulary, else [..., vocab+1]
        (the reduced tokens in `token_ids` order, then "other")."""
        h = self.features(hidden)
        if not self.vocab:
            return lm_head(h)
        if self._rows is None or self._rows.shape[0] != self.vocab:
            self._rows = lm_head.weight.detach()[self.token_ids]  # [vocab, hidden]
            # the same rows laid out for bfloat16 products, or None: a plain attribute, which unpacked_copy drops
            self.__dict__["packed_rows"] = pack_matrix(self._rows)
        rows = matrix_rows(h, self._rows, self.__dict__.get("packed_rows"))  # [..., vocab]
        return torch.cat([rows, self.other(h)], dim=-1)

    def forward(self, hidden, lm_head):
        """Full-vocabulary logits; a reduced head spreads "other" evenly over the tokens it lacks."""
        logits = self.class_logits(hidden, lm_head)
        if not self.vocab:
            return logits
        n_vocab = lm_head.weight.shape[0]
        rest = logits[..., -1:] - math.log(n_vocab - self.vocab)  # [..., 1]
        full = rest.expand(*logits.shape[:-1], n_vocab).clone()  # [..., 1] -> [..., n_vocab]
        full[..., self.token_ids] = logits[..., :-1]
        return full

    def top1(self, hidden, lm_head):
        if not self.vocab:
            return top1(self.class_logits(hidden, lm_head)[0, -1])
        probs = torch.softmax(self.class_logits(hidden, lm_head)[0, -1].float(), dim=-1)
        # The best real token: when "other" is more likely, its probability is below 1/2,
        # so at thresholds of 0.5 and above the edge defers to the cloud.
        best = int(torch.argmax(probs[:-1]))
        return int(self.token_ids[best]), float(probs[best])


class DecoderLayerHead(ExitHead):
    """One extra decoder layer (a copy of the model's last layer, as in EE-Tuning), final norm, LM head.

    It attends over the sequence, so it needs its own KV cache at run time; the edge partition
    has no support for that, so this head is for teacher-forced measurement only: forward()
    takes whole sequences from position 0.
    """

    arch = "layer"
    positionwise = False

    def __init__(self, model: torch.nn.Module, init_layer: int = -1) -> None:
        super().__init__()
        self.init_layer = init_layer
        self.layer = unpacked_copy(model.model.layers[init_layer])
        self.rotary = copy.deepcopy(model.model.rotary_emb)
        self.norm = copy.deepcopy(model.model.norm)

    def forward(self, hidden, lm_head):
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)  # [1, T]
        rope = self.rotary(hidden, positions)
        x = self.layer(hidden, attention_mask=None, position_embeddings=rope)  # causal SDPA
        x = x[0] if isinstance(x, tuple) else x
        return lm_head(self.norm(x))

    def top1(self, hidden, lm_head):
        raise UserError("the 'layer' head needs its own KV cache, which the edge partition does not have; "
                        "it can only be measured teacher-forced")


def head_architectures() -> dict[str, type[ExitHead]]:
    """Known head architectures by name (heads files name theirs)."""
    return {cls.arch: cls for cls in (NormHead, AdapterHead, DecoderLayerHead)}


def build_head(arch: str, model: torch.nn.Module, options: dict) -> ExitHead:
    """A fresh head of architecture `arch` for `model`, initialised as the logit lens."""
    archs = head_architectures()
    if arch not in archs:
        raise UserError(f"unknown head architecture {arch!r}; known: {', '.join(sorted(archs))}")
    cls = archs[arch]
    if cls is NormHead:
        if options:
            raise UserError(f"the 'norm' head takes no options, got {options}")
        return NormHead(model.model.norm)
    try:
        return cls(model, **options)
    except TypeError as exc:
        raise UserError(f"bad options {options} for head architecture {arch!r}: {exc}") from None


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
    def lens(cls, model: torch.nn.Module, exits: tuple[int, ...]) -> HeadSet:
        """Untrained default: the model's final norm at every exit."""
        return cls(exits=tuple(exits), heads={e: NormHead(model.model.norm) for e in exits})

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the heads; `dtype` (e.g. torch.float16) stores floating tensors smaller."""
        tensors = {}
        for e, head in self.heads.items():
            for name, value in head.state_dict().items():
                value = value.detach().contiguous().cpu()
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                tensors[f"exit{e}.{name}"] = value
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
    def load(cls, path: str | Path, model: torch.nn.Module, model_identity: str) -> HeadSet:
        """Load heads for `model`; a file made for another model fails with a UserError."""
        path = Path(path)
        meta = read_heads_meta(path, model_identity, model.config.num_hidden_layers)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        exits, arch, options = meta.exits, meta.arch, meta.arch_options
        heads = {}
        for e in exits:
            head = build_head(arch, model, options)
            prefix = f"exit{e}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            expected = set(head.state_dict())
            if set(state) != expected:
                raise UserError(f"{path}: exit {e} does not fit architecture {arch!r} "
                                f"(missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)})")
            for name, value in state.items():  # shapes first: load_state_dict's message is long
                target = head.state_dict().get(name)
                if target is not None and target.shape != value.shape:
                    raise UserError(f"{path}: exit {e} was made for another model size ({name} is "
                                    f"{tuple(value.shape)}, this model needs {tuple(target.shape)})")
            head.load_state_dict(state)
            heads[e] = head.to(model.dtype).eval()  # the model's compute dtype, whatever the file's
        return cls(exits, heads, arch, options, meta.model_identity, meta.training)


def load_heads(resolved: Resolved, loaded) -> HeadSet:
    """The heads a resolved spec names (the logit lens when it names no file), for its split."""
    split = resolved.split
    if resolved.heads is None:
        return HeadSet.lens(loaded.model, split.exits)
    heads = HeadSet.load(resolved.heads, loaded.model, loaded.identity)
    if heads.exits != split.exits:
        raise UserError(f"{resolved.heads} holds heads for exits {','.join(map(str, heads.exits))}, "
                        f"the split has {','.join(map(str, split.exits))}")
    return heads


def edge_setup(spec: ModelSpec, loaded) -> tuple[Split, HeadSet]:
    """The split and exit heads `spec` gives for `loaded` (a loading.LoadedModel)."""
    resolved = spec.resolve(loaded)
    return resolved.split, load_heads(resolved, loaded)
