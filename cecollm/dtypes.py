"""The compute dtype of the model, the dtype on the wire, and their torch and numpy forms.

Importable without torch (the command lines build their options from it). Dtypes travel and
are configured by their names ("float32", "bfloat16", "float16"); numpy has no bfloat16, so
the `ml_dtypes` package supplies it for wire tensors and shared-memory views.
"""

from __future__ import annotations

import os

from cecollm.errors import UserError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what --dtype takes
DTYPE_ENV = "CECOLLM_DTYPE"  # overrides default_dtype() (the tests pin float32 with it)


def default_dtype() -> str:
    """The compute dtype when none is given: $CECOLLM_DTYPE if set, else float32.

    Measured on an AVX512-BF16 CPU (SmolLM2, results/bench-engine and results/scaling): one decoding
    stream is no faster in bfloat16 (18.3 against 18.9 tokens/s, one thread), while the exact mode,
    which verifies rows together, gives the full model's output only up to near-ties there (16 of 20
    Alpaca answers identical to cloud-only, `cecollm bench`), where float32 gives 20 of 20. bfloat16
    pays off in a batched cloud (32 rows of the LM head cost 1.5x one row, 3.5x in float32): pass
    --dtype bfloat16 to the broker and its edges for that."""
    chosen = os.environ.get(DTYPE_ENV, "").strip()
    return check_dtype(chosen, DTYPE_ENV) if chosen else "float32"


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
