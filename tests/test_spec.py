"""ModelSpec: options in, the split and heads file out, the same for every command; and the
bundled default heads (cecollm/data): every defaults.json entry names a heads file made for that
model identity and those exits, with the command that made it recorded."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from safetensors import safe_open

from cecollm.config import DEFAULT_MODEL
from cecollm.edge.heads import HeadSet, edge_setup
from cecollm.errors import UserError
from cecollm.loading import load_model
from cecollm.spec import HEADS_FORMAT, ModelSpec

from conftest import make_tiny_model


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


def test_options_round_trip_and_empty_means_default():
    spec = ModelSpec.from_options("m", "2, 4", 3, "h.safetensors")
    assert spec == ModelSpec("m", (2, 4), 3, "h.safetensors")
    assert spec.options() == ["--model", "m", "--exits", "2,4", "--upload-layer", "3", "--heads", "h.safetensors",
                              "--dtype", "float32"]  # conftest pins the machine's default to float32
    assert ModelSpec.from_options(None, "", 0, "") == ModelSpec() == ModelSpec(DEFAULT_MODEL)
    assert ModelSpec().options() == ["--model", DEFAULT_MODEL, "--dtype", "float32"]
    assert ModelSpec.from_options("m", dtype="bfloat16").options() == ["--model", "m", "--dtype", "bfloat16"]
    with pytest.raises(UserError, match="--exits"):
        ModelSpec.from_options("m", "2,x")
    with pytest.raises(UserError, match="--dtype must be one of float32, bfloat16, float16, got 'half'"):
        ModelSpec("m", dtype="half")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny"
    make_tiny_model("mha").save_pretrained(path)
    return load_model(str(path))


def test_resolve_without_defaults_takes_the_options_or_quarter_and_half(tiny):
    n = tiny.n_layers
    plain = ModelSpec(str(tiny.path)).resolve(tiny)
    assert plain.heads is None and plain.split.exits == (n // 4, n // 2) and plain.split.upload_layer == n // 2
    chosen = ModelSpec(str(tiny.path), (2, 4), 3).resolve(tiny)
    assert chosen.split.exits == (2, 4) and chosen.split.upload_layer == 3 and chosen.heads is None
    with pytest.raises(UserError, match="out of range"):
        ModelSpec(str(tiny.path), (2, 99)).resolve(tiny)


def test_a_heads_file_gives_the_split_and_the_edge_its_heads(tiny, tmp_path):
    path = tmp_path / "heads.safetensors"
    HeadSet.lens(tiny.model, (1, 3)).save(path)
    spec = ModelSpec(str(tiny.path), heads=str(path))
    resolved = spec.resolve(tiny)  # what the cloud does: metadata only
    assert resolved.split.exits == (1, 3) and resolved.heads == path
    split, heads = edge_setup(spec, tiny)  # what the edge does: the heads themselves
    assert split == resolved.split and heads.exits == (1, 3)
    with pytest.raises(UserError, match="differ from the heads file"):
        ModelSpec(str(tiny.path), (2, 4), heads=str(path)).resolve(tiny)
    with pytest.raises(UserError, match="heads file not found"):
        ModelSpec(str(tiny.path), heads=str(tmp_path / "none")).resolve(tiny)
