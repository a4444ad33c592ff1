"""The compute dtype of the model, the dtype on the wire, and their torch and numpy forms.

Importable without torch (the command lines build their options from it). Dtypes travel and
are configured by their names ("float32", "bfloat16", "float16"); numpy has no bfloat16, so
the `ml_dtypes` package supplies it for wire tensors and shared-memory views.
"""

from __future__ import annotations

import os
from pathlib import Path

from cecollm.errors import UserError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what --dtype takes
DTYPE_ENV = "CECOLLM_DTYPE"  # overrides default_dtype() (the tests pin float32 with it)


_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags of bfloat16 arithmetic in hardware


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 says flags, arm64 Features
            return set(value.split())
    return set()


def default_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The compute dtype when none is given: $CECOLLM_DTYPE if set, else bfloat16 where the CPU has
    native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16), else float32.

    Measured on an AVX512-BF16 CPU (SmolLM2, one thread; results/bench-engine, results/bench-wifi-bf16,
    results/scaling): on packed weights (packing.py) one stream decodes 1.31x as fast as in float32
    (24.4 against 18.7 tokens/s), the exact mode gives cloud-only's tokens bit for bit as in float32,
    uploads are bit-exact at 2 bytes a value, and a batched cloud gains most (32 rows of the LM head
    cost 1.5x one row, 3.5x in float32). Without the hardware torch emulates bfloat16, slower than
    float32, so float32 stays there."""
    chosen = os.environ.get(DTYPE_ENV, "").strip()
    if chosen:
        return check_dtype(chosen, DTYPE_ENV)
    return "bfloat16" if cpu_flags(cpuinfo) & set(_NATIVE_BF16_FLAGS) else "float32"


def check_dtype(name: str, what: str = "--dtype") -> str:
    """`name` if it is a compute dtype, else a one-line UserError."""
    if name not in COMPUTE_DTYPES:
        raise UserError(f"{what} must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return name


def wire_dtype(compute: str, fp16: bool = True) -> str:
    """The dtype of uploaded hidden states: 2 bytes a value (the paper's), the model's own when it
    is 2 bytes wide (bfloat16 and float16 uploads are then bit-exact), float16 for a float32 model;
    float32 with `fp16` off (the paper's ablation, --no-fp16)."""
    if not fp16:
        return "float32"
    return compute if compute in ("bfloat16", "float16") else "float16"


def torch_dtype(name: str):
    """The torch dtype of a dtype name."""
    import torch

    return getattr(torch, check_dtype(name, "dtype"))


def name_of(dtype) -> str:
    """The name of a torch dtype ("torch.bfloat16" -> "bfloat16") or a numpy one."""
    return str(dtype).removeprefix("torch.")


def numpy_dtype(name: str):
    """The numpy dtype of a dtype name; bfloat16 is ml_dtypes' (numpy has none)."""
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def to_numpy(tensor):
    """A CPU tensor as a numpy array sharing its memory (bfloat16 too, through ml_dtypes)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return tensor.numpy()


def from_numpy(array):
    """A numpy array as a tensor sharing its memory (bfloat16 too)."""
    import torch

    if array.dtype == numpy_dtype("bfloat16"):
        return torch.from_numpy(array.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(array)
