"""Compute dtypes: the machine's default, the wire dtype rule, numpy's bfloat16, loading in each dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cecollm.dtypes import (
    COMPUTE_DTYPES,
    check_dtype,
    default_dtype,
    from_numpy,
    numpy_dtype,
    to_numpy,
    torch_dtype,
    wire_dtype,
)
from cecollm.errors import UserError


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return path


@pytest.mark.parametrize("flags,expected", [("avx2 avx512f avx512_bf16", "bfloat16"), ("amx_tile amx_bf16", "bfloat16"),
                                            ("avx2 avx512f", "float32"), ("", "float32")])
def test_default_is_bfloat16_only_with_native_support(tmp_path, monkeypatch, flags, expected):
    monkeypatch.delenv("CECOLLM_DTYPE", raising=False)
    assert default_dtype(_cpuinfo(tmp_path, flags)) == expected


def test_no_cpuinfo_is_float32(tmp_path, monkeypatch):
    monkeypatch.delenv("CECOLLM_DTYPE", raising=False)
    assert default_dtype(tmp_path / "missing") == "float32"


def test_the_environment_chooses_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("CECOLLM_DTYPE", "float16")
    assert default_dtype(_cpuinfo(tmp_path, "avx512_bf16")) == "float16"
    monkeypatch.setenv("CECOLLM_DTYPE", "int8")
    with pytest.raises(UserError, match="CECOLLM_DTYPE must be one of float32, bfloat16, float16, got 'int8'"):
        default_dtype()


def test_bad_dtype_is_a_user_error():
    with pytest.raises(UserError, match="--dtype"):
        check_dtype("float64")


@pytest.mark.parametrize("compute,fp16,expected", [
    ("float32", True, "float16"), ("bfloat16", True, "bfloat16"), ("float16", True, "float16"),
    ("float32", False, "float32"), ("bfloat16", False, "float32"), ("float16", False, "float32")])
def test_wire_dtype_is_the_models_when_two_bytes_wide(compute, fp16, expected):
    assert wire_dtype(compute, fp16) == expected


@pytest.mark.parametrize("name", COMPUTE_DTYPES)
def test_numpy_views_share_memory_and_bits(name):
    t = torch.randn(3, 5).to(torch_dtype(name))
    a = to_numpy(t)
    assert a.dtype == numpy_dtype(name) and a.dtype.name == name and a.shape == (3, 5)
    back = from_numpy(a)
    assert back.dtype == t.dtype and torch.equal(back, t)
    a[0, 0] = 7  # the same memory: a copy would leave t alone
    assert float(t[0, 0]) == 7.0
    assert np.array_equal(a.astype(np.float32), t.float().numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mapped_and_loaded_weights_are_the_same_in_each_dtype(model_dir, dtype, tmp_path, monkeypatch):
    """The cloud maps a converted copy (written once), the edge converts at load: both hold the same bits."""
    from cecollm.loading import load_model
    from cecollm.weights import load_mapped

    monkeypatch.setenv("CECOLLM_HOME", str(tmp_path))
    loaded = load_model(str(model_dir), dtype)
    mapped = load_mapped(model_dir, dtype)
    assert loaded.model.dtype == mapped.dtype == torch_dtype(dtype)
    edge, cloud = loaded.model.state_dict(), mapped.state_dict()
    assert edge.keys() == cloud.keys()
    for name in edge:
        assert torch.equal(edge[name], cloud[name]), name
    copies = list((tmp_path / "models" / "dtypes").glob(f"*-{dtype}.safetensors"))
    assert len(copies) == 1  # one converted file, reused by the next load
    stamp = copies[0].stat().st_mtime_ns
    load_mapped(model_dir, dtype)
    assert copies[0].stat().st_mtime_ns == stamp
    rotary = (loaded.model.model.rotary_emb.inv_freq, mapped.model.rotary_emb.inv_freq)
    assert rotary[0].dtype == rotary[1].dtype and torch.equal(*rotary)
