"""Load a model with its weights mapped from the safetensors file, not copied.

The model is built on the meta device, then every parameter becomes a tensor over a private
(copy-on-write) memory map of the float32 safetensors file, with load_state_dict(assign=True).
Pages nobody writes stay shared with the page cache, so N worker processes on one host hold
one copy of the weights (and only the pages of the layers they run are ever touched).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from cecollm.errors import UserError

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


def load_mapped(model_dir: Path) -> torch.nn.Module:
    """The model of a transformers directory, float32, eval mode, weights mapped from disk."""
    from cecollm.llama import load_native

    model_dir = Path(model_dir)
    native = load_native(model_dir, mapped=True)  # our own modules: no transformers import
    if native is not None:
        return native
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no .safetensors file to map")
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    state = {}
    for file in files:
        state.update(map_safetensors(file))
    if any(t.dtype != torch.float32 for t in state.values()):
        raise UserError(f"{model_dir}: weights are not float32; convert the model first")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{model_dir}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    # Non-persistent buffers (the rotary table) are not in the file: build them for real.
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert not tensor.is_meta, f"{name} is still on the meta device after mapping"
    return model.eval()
