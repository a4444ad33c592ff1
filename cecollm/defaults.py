"""Pick the split and the exit heads for a model: from the options, or the model's defaults.

Measured defaults (exits and trained heads) ship in `cecollm/data/defaults.json`, keyed by
model identity (see `cecollm/data/HEADS.md` for how they were made); asking for a model's
default exits explicitly also gets its trained heads. A model without an entry gets exits at
a quarter and half of its depth with the untrained logit-lens heads.
"""

from __future__ import annotations

import json
from importlib import resources

from cecollm.edge.heads import HeadSet
from cecollm.errors import UserError
from cecollm.loading import LoadedModel
from cecollm.split import Split, default_exits


def _bundled_defaults() -> dict:
    """defaults.json ships with the package: a missing file is a broken install, not "no defaults"
    (silently falling back would give the default model untrained heads at other exits)."""
    return json.loads((resources.files("cecollm") / "data" / "defaults.json").read_text())


def choose_split(
    loaded: LoadedModel,
    exits: tuple[int, ...] | None = None,
    upload_layer: int | None = None,
    heads_path: str | None = None,
) -> tuple[Split, HeadSet]:
    """The split and heads to use, checked against the model."""
    n = loaded.n_layers
    if heads_path:
        heads = HeadSet.load(heads_path, loaded.model, loaded.identity)
        if exits and tuple(exits) != heads.exits:
            raise UserError(f"--exits {','.join(map(str, exits))} differ from the heads file's {','.join(map(str, heads.exits))}")
        return Split.create(n, heads.exits, upload_layer), heads
    entry = _bundled_defaults().get(loaded.identity)
    if entry and (not exits or tuple(exits) == tuple(entry["exits"])):
        heads = _bundled_heads(loaded, entry)
        return Split.create(n, heads.exits, upload_layer), heads
    if exits:
        split = Split.create(n, exits, upload_layer)
        return split, HeadSet.lens(loaded.model, split.exits)
    split = Split.create(n, default_exits(n), upload_layer)
    return split, HeadSet.lens(loaded.model, split.exits)


def _bundled_heads(loaded: LoadedModel, entry: dict) -> HeadSet:
    """The trained heads a defaults entry names; they must be for the entry's exits."""
    heads_file = resources.files("cecollm") / "data" / entry["heads"]
    with resources.as_file(heads_file) as path:
        heads = HeadSet.load(path, loaded.model, loaded.identity)
    assert tuple(heads.exits) == tuple(entry["exits"]), f"defaults.json: {entry['heads']} is for exits {heads.exits}, not {entry['exits']}"
    return heads
