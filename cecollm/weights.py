"""Load a model with its weights mapped from the safetensors file, not copied.

The model is built on the meta device, then every parameter becomes a tensor over a private
(copy-on-write) memory map of the float32 safetensors file, with load_state_dict(assign=True).
Pages nobody writes stay shared with the page cache, so N worker processes on one host hold
one copy of the weights (and only the pages of the layers they run are ever touched).

A bfloat16 or float16 model maps a converted copy of the float32 file: written once per dtype
under $CECOLLM_HOME/models/dtypes/ (keyed by the float32 file's name, size and hash, see
loading._file_key), so the workers still share one copy of the half-size weights, and a start
converts nothing.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import tempfile
from pathlib import Path

import torch

from cecollm.config import cecollm_home
from cecollm.dtypes import torch_dtype
from cecollm.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views of one copy-on-write memory map."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (header_len,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which cannot be mapped")
        begin, end = info["data_offsets"]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])  # [shape as stored]
    return tensors


def converted(path: Path, dtype: str) -> Path:
    """The copy of the float32 safetensors file `path` in `dtype` (written once, atomically); `path` for float32."""
    if dtype == "float32":
        return path
    from safetensors.torch import save_file

    from cecollm.loading import _file_key

    target = cecollm_home() / "models" / "dtypes" / f"{_file_key(path)}-{dtype}.safetensors"
    if target.is_file():
        return target
    log.info("converting %s once to %s in %s", path.name, dtype, target)
    to = torch_dtype(dtype)
    tensors = {name: t.to(to) if t.is_floating_point() else t.clone() for name, t in map_safetensors(path).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep workers of other users out, as the float32 file does not
        os.replace(tmp, target)  # whole or absent: a start that finds it may map it
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def assign_weights(model: torch.nn.Module, state: dict, tied: bool, model_dir: Path) -> None:
    """Make `state`'s tensors the parameters of `model` (built on the meta device; no copy), the LM head the
    embedding when `tied`; a one-line error when they do not fit its config."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{model_dir}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_mapped(model_dir: Path, dtype: str = "float32") -> torch.nn.Module:
    """The model of a transformers directory in `dtype` (float32 weights converted once, see `converted`),
    eval mode, weights mapped from disk: in cecollm.llama's modules where it can (no transformers import),
    else transformers'."""
    from cecollm.llama import load_native

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no .safetensors file to map")
    try:
        for file in files:
            if any(t.dtype != torch.float32 for t in map_safetensors(file).values()):
                raise UserError(f"{model_dir}: weights are not float32; convert the model first")
        files = [converted(file, dtype) for file in files]
    except (OSError, ValueError, struct.error) as exc:  # a damaged file
        raise UserError(f"{model_dir}: cannot load the weights ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    native = load_native(model_dir, mapped=True, dtype=torch_dtype(dtype), files=files)
    if native is not None:
        return native
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), attn_implementation="sdpa")
    state = {}
    for file in files:
        state.update(map_safetensors(file))
    assign_weights(model, state, config.tie_word_embeddings, model_dir)
    # Non-persistent buffers (the rotary table) are not in the file: build them for real.
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert not tensor.is_meta, f"{name} is still on the meta device after mapping"
    return model.eval()
