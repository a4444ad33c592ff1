"""The bundled default heads (cecollm/data): every defaults.json entry names a heads file made
for that model identity and those exits, with the command that made it recorded."""

from __future__ import annotations

import json
from importlib import resources

from safetensors import safe_open

from cecollm.edge.heads import HEADS_FORMAT


def test_bundled_heads_match_their_defaults_entry():
    data = resources.files("cecollm") / "data"
    entries = json.loads((data / "defaults.json").read_text())
    assert entries, "defaults.json has no entry: the default model would run with untrained heads"
    for identity, entry in entries.items():
        path = data / entry["heads"]
        assert path.is_file(), entry
        with resources.as_file(path) as p, safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == HEADS_FORMAT
        assert meta["model_identity"] == identity
        assert json.loads(meta["exits"]) == entry["exits"]
        training = json.loads(meta["training"])
        assert training["command"].startswith("cecollm train-exits")
        assert training["command"] in (data / "HEADS.md").read_text()
        assert p.stat().st_size < 8 * 2**20
