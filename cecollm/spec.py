"""Which model and split a command runs: one `ModelSpec`, resolved the same way everywhere.

A spec names the model, its exits, the upload layer and a heads file; `resolve` turns it,
with the loaded model, into the split and where the exit heads come from. Measured defaults
(exits and trained heads) ship in `cecollm/data/defaults.json`, keyed by model identity (see
`cecollm/data/HEADS.md`); asking for a model's default exits explicitly also gets its trained
heads. A model without an entry gets exits at a quarter and half of its depth with the
untrained logit-lens heads. The cloud needs only the split: it reads a heads file's metadata,
never its tensors (the heads themselves are the edge's, see edge/heads.py).

A heads file is safetensors: tensors named `exit{N}.{param}` and metadata recording the
format, the model identity, the exits, the head architecture and the training settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cecollm.config import DEFAULT_MODEL
from cecollm.dtypes import check_dtype, default_dtype
from cecollm.errors import UserError
from cecollm.split import Split, default_exits, parse_exits

HEADS_FORMAT = "cecollm-heads/1"


@dataclass(frozen=True)
class HeadsMeta:
    """What a heads file's metadata says, checked against the model it is for."""

    exits: tuple[int, ...]
    arch: str  # the head architecture's name (edge/heads.py)
    arch_options: dict = field(default_factory=dict)  # its constructor options
    model_identity: str = ""  # the model the heads were trained for ("" = any)
    training: dict = field(default_factory=dict)  # settings and results of the training run


def read_heads_meta(path: str | Path, model_identity: str, n_layers: int) -> HeadsMeta:
    """A heads file's metadata; a UserError for a missing or damaged file, or one of another model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"heads file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a bad file
        raise UserError(f"{path} is not a heads file: {exc}") from None
    if meta.get("format") != HEADS_FORMAT:
        raise UserError(f"{path} is not a cecollm heads file (format {meta.get('format')!r})")
    if meta.get("model_identity") and meta["model_identity"] != model_identity:
        raise UserError(f"{path} was trained for another model (identity {meta['model_identity'][:12]}, "
                        f"this model is {model_identity[:12]})")
    try:
        exits = tuple(int(e) for e in json.loads(meta["exits"]))
        options = json.loads(meta.get("arch_options") or "{}")
        training = json.loads(meta.get("training") or "{}")
        if not isinstance(options, dict) or not isinstance(training, dict):
            raise TypeError("arch_options and training are JSON objects")
        result = HeadsMeta(exits, meta["arch"], options, meta.get("model_identity", ""), training)
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path}: the heads file's metadata is damaged (exits, arch, arch_options, training)") from None
    if not exits or any(not 1 <= e < n_layers for e in exits):
        raise UserError(f"{path} has exits {','.join(map(str, exits))}, but this model has {n_layers} layers")
    return result


def bundled_defaults() -> dict:
    """defaults.json ships with the package: a missing file is a broken install, not "no defaults"
    (silently falling back would give the default model untrained heads at other exits)."""
    return json.loads((resources.files("cecollm") / "data" / "defaults.json").read_text())


def bundled_file(name: str) -> Path:
    """A file of the package's data directory."""
    return Path(str(resources.files("cecollm") / "data" / name))


@dataclass(frozen=True)
class Resolved:
    """A spec resolved against its model: the split, and the heads file (None: the logit lens)."""

    split: Split
    heads: Path | None


@dataclass(frozen=True)
class ModelSpec:
    """The model and split options every command shares; the click options default to these."""

    model: str = DEFAULT_MODEL  # a transformers directory, a .gguf file, or the default model's name
    exits: tuple[int, ...] = ()  # exits as numbers of decoder layers run; () = the model's default split
    upload_layer: int = 0  # the layer whose output the cloud receives; 0 = the last exit
    heads: str = ""  # exit heads file (from `cecollm train-exits`); "" = the model's default heads
    dtype: str = field(default_factory=default_dtype)  # compute dtype; default: the machine's (dtypes.default_dtype)

    def __post_init__(self) -> None:
        check_dtype(self.dtype)

    @classmethod
    def from_options(cls, model: str | None = None, exits: str | None = None, upload_layer: int | None = None,
                     heads: str | None = None, dtype: str | None = None) -> ModelSpec:
        """A spec from command-line text: exits as "8,15"; empty or missing values are defaults."""
        return cls(model or DEFAULT_MODEL, parse_exits(exits) if exits else (), upload_layer or 0, heads or "",
                   dtype or default_dtype())

    def options(self) -> list[str]:
        """The command-line options that give this spec to another cecollm command."""
        out = ["--model", self.model]
        if self.exits:
            out += ["--exits", ",".join(map(str, self.exits))]
        if self.upload_layer:
            out += ["--upload-layer", str(self.upload_layer)]
        if self.heads:
            out += ["--heads", self.heads]
        return out + ["--dtype", self.dtype]

    def load(self, mapped: bool = False, transformers: bool = False):
        """The loaded model (loading.LoadedModel) in the spec's dtype; `mapped`: weights mapped from disk, no
        tokenizer (the cloud).

        A Llama directory loads into cecollm.llama's modules with cecollm.tokenizer's tokenizer, without
        importing transformers (a fast start); `transformers`: a transformers model (to call or train)."""
        from cecollm.loading import LoadedModel, load_model, resolve_model_dir

        if transformers:
            return load_model(self.model, self.dtype)
        path = resolve_model_dir(self.model)
        if mapped:
            from cecollm.weights import load_mapped

            return LoadedModel(load_mapped(path, self.dtype), None, path, self.model)  # not packed: workers pack theirs
        from cecollm.dtypes import torch_dtype
        from cecollm.llama import load_native

        model = load_native(path, dtype=torch_dtype(self.dtype))
        if model is None:
            loaded = load_model(self.model, self.dtype)
            _packed(loaded.model)
            return loaded
        _packed(model)
        from cecollm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
        if tokenizer is None and (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        return LoadedModel(model, tokenizer, path, self.model)

    def resolve(self, loaded) -> Resolved:
        """The split and heads file for `loaded` (a loading.LoadedModel), checked against it."""
        n = loaded.n_layers
        upload = self.upload_layer or None
        if self.heads:
            meta = read_heads_meta(self.heads, loaded.identity, n)
            if self.exits and self.exits != meta.exits:
                raise UserError(f"--exits {','.join(map(str, self.exits))} differ from the heads file's "
                                f"{','.join(map(str, meta.exits))}")
            return Resolved(Split.create(n, meta.exits, upload), Path(self.heads))
        entry = bundled_defaults().get(loaded.identity)
        if entry and (not self.exits or self.exits == tuple(entry["exits"])):
            return Resolved(Split.create(n, entry["exits"], upload), bundled_file(entry["heads"]))
        return Resolved(Split.create(n, self.exits or default_exits(n), upload), None)


def _packed(model):
    """`model` with its bfloat16 products on packed weights (packing.pack_linears; other dtypes as they are)."""
    from cecollm.packing import pack_linears

    pack_linears(model)
    return model
