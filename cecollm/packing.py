"""bfloat16 matrix products on weights laid out once for oneDNN: F.linear's bits at about half its time.

For a bfloat16 weight torch's F.linear calls oneDNN with the weight as it is in memory, and a
decode step (one row) then costs as much as in float32 although it reads half the bytes:
SmolLM2's layer products take 1.25 ms a token in both (one thread, this repository's
results/bench-engine). oneDNN's linear on a weight reordered once into its own layout (what
torch.compile's CPU backend does) takes about half: 23 against 53 µs for 576x576, 2.4 against 4.8 ms
for the LM head, at 1 to 32 rows.

The packed product gives F.linear's bits for up to MAX_PACKED_ROWS rows (checked at load time on
each weight shape of the model), and a row among up to that many gets the bits it gets alone. More
rows go in pieces of that many, so every row of a bfloat16 model gets one row's bits however rows
are grouped: a prompt pass, a verification of drafts, a batch of devices (F.linear itself picks
another kernel past 32 rows, which rounds otherwise: a prompt of more than 32 rows then equals
transformers' only up to near-ties, as every bfloat16 comparison with it does). Float32 and float16
gain nothing this way (measured: no faster, and not bit-equal) and stay with F.linear.

An exit head's rows of the LM head (a reduced vocabulary, a matrix outside any nn.Linear) are packed the
same way (pack_matrix, matrix_rows): 0.45 against 0.80 ms a row for 8192 rows of SmolLM2 (one thread).

The packed copies are private memory next to the weights, per edge and per worker (a mapped model's
weights stay shared between workers; the packed ones are per process): 270 MB for SmolLM2.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_DIFFERS = "bfloat16 packed products differ from F.linear's here on %s; using F.linear"  # the warning when the load-time check fails
MAX_PACKED_ROWS = 32  # rows of one packed product: up to here it equals F.linear and each row its one-row bits


def supported(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` are packed on this machine: bfloat16 with oneDNN's bfloat16 kernels."""
    return (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def pack_linears(model: torch.nn.Module) -> int:
    """Pack `model`'s bfloat16 weights for inference: an attention's q, k and v as one matrix, an MLP's gate
    and up as one (one longer stream of weights a row: ~10% less time than three and two), every other
    nn.Linear alone, its class swapped for one whose forward uses the packed weight. The number of
    matrices packed: 0 where the dtype gains nothing or the load-time check finds other bits than F.linear's
    (then a warning: bfloat16 runs on F.linear, slower, and rows grouped otherwise round otherwise).
    The weights of packed modules stop requiring gradients (a packed model is for inference)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or not supported(linears[0].weight.dtype) or any(_is_packed(m) for m in model.modules()):
        return 0
    groups = []  # (owner, attribute, [linears]): fused groups first, then each other linear alone
    for owner in model.modules():
        for attribute, names in FUSED.items():
            parts = [getattr(owner, name, None) for name in names]
            if all(isinstance(p, torch.nn.Linear) and p.bias is None for p in parts):
                groups.append((owner, attribute, parts))
    fused = {id(p) for _, _, parts in groups for p in parts}
    groups += [(m, "packed", [m]) for m in linears if id(m) not in fused]
    with torch.inference_mode():
        checked = {}
        for _, _, parts in groups:
            key = tuple((tuple(p.weight.shape), p.bias is not None) for p in parts)
            if key not in checked:
                checked[key] = _agrees([p.weight.detach() for p in parts], parts[0].bias if len(parts) == 1 else None)
            if not checked[key]:
                log.warning(_DIFFERS, key)
                return 0
        for owner, attribute, parts in groups:
            weight = torch.cat([p.weight.detach() for p in parts]) if len(parts) > 1 else parts[0].weight.detach()
            # a plain attribute: not a parameter, not in the state dict
            owner.__dict__[attribute] = (torch.ops.mkldnn._reorder_linear_weight(weight, 1),
                                         [p.weight.shape[0] for p in parts])
            for part in parts:
                part.weight.requires_grad_(False)
            if attribute == "packed":
                owner.__class__ = _packed_class(type(owner))
    return len(groups)


def pack_matrix(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in], a matrix held outside any nn.Linear (an exit head's rows of the LM head), laid
    out for matrix_rows; None where its dtype gains nothing or the check finds other bits than F.linear's."""
    if not supported(weight.dtype):
        return None
    weight = weight.detach().contiguous()
    with torch.inference_mode():
        if not _agrees([weight], None):
            log.warning(_DIFFERS, tuple(weight.shape))
            return None
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def matrix_rows(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight): on `packed` (pack_matrix of weight) where there is one and x's rows can use it."""
    if packed is None or not _packable(x, packed):
        return F.linear(x, weight)
    return _product(x, packed, None)


def unpacked_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` without packed weights (packed tensors cannot be copied, and a copy whose
    weights change must not keep products of the old ones)."""
    memo = {id(value): None for m in module.modules() for key, value in m.__dict__.items() if key.startswith("packed")}
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():
        for key in [key for key in m.__dict__ if key.startswith("packed")]:
            del m.__dict__[key]
        m.__class__ = _UNPACKED.get(type(m), type(m))
    return clone


_PACKED: dict[type, type] = {}  # a Linear class -> its packed subclass
_UNPACKED: dict[type, type] = {}  # the reverse


def _packed_class(cls: type) -> type:
    """`cls` with linear_rows as its forward (a subclass made once per class)."""
    if cls not in _PACKED:
        packed = type(f"Packed{cls.__name__}", (cls,), {"forward": linear_rows, "__module__": __name__})
        _PACKED[cls], _UNPACKED[packed] = packed, cls
    return _PACKED[cls]


def _is_packed(module: torch.nn.Module) -> bool:
    return any(key.startswith("packed") for key in module.__dict__)


FUSED = {"packed_qkv": ("q_proj", "k_proj", "v_proj"), "packed_gate_up": ("gate_proj", "up_proj")}  # attribute -> parts


def fused_rows(x: torch.Tensor, owner: torch.nn.Module, attribute: str) -> tuple[torch.Tensor, ...] | None:
    """The products of x [..., in] with each part of `owner`'s fused group `attribute` (views of one
    output [..., sum of outs]), or None where the packed weight is not used (see _packable)."""
    entry = owner.__dict__.get(attribute)
    if entry is None or not _packable(x, entry[0]):
        return None
    packed, sizes = entry
    return _product(x, packed, None).split(sizes, dim=-1)


def linear_rows(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """module(x): on the packed weight, in pieces of at most MAX_PACKED_ROWS rows; F.linear where it has
    none or while recording gradients."""
    entry = module.__dict__.get("packed")
    if entry is None or not _packable(x, entry[0]):
        return F.linear(x, module.weight, module.bias)
    return _product(x, entry[0], module.bias)


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] times the packed weight: [..., out], in pieces of at most MAX_PACKED_ROWS rows."""
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [rows, in]
    if rows.shape[0] <= MAX_PACKED_ROWS:
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    else:
        out = torch.cat([torch.ops.mkldnn._linear_pointwise(rows[i:i + MAX_PACKED_ROWS], packed, bias, "none", [], "")
                         for i in range(0, rows.shape[0], MAX_PACKED_ROWS)])
    return out.view(*x.shape[:-1], out.shape[-1])  # [rows, out] -> [..., out]


def _packable(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether x's rows go through a packed weight: rows of its dtype, no gradient to record (the packed
    product has no backward; packed modules' weights require none)."""
    return (x.numel() > 0 and x.dtype == packed.dtype
            and not (x.requires_grad and torch.is_grad_enabled()))


def _agrees(weights: list[torch.Tensor], bias: torch.Tensor | None) -> bool:
    """Whether the packed product of `weights` (stacked) gives, for every row count up to MAX_PACKED_ROWS
    (a sample of counts for a large weight, such as an LM head), F.linear's bits and each row the bits it
    gets alone."""
    stacked = torch.cat(weights)
    packed = torch.ops.mkldnn._reorder_linear_weight(stacked, 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MAX_PACKED_ROWS, stacked.shape[1], generator=generator).to(stacked.dtype)
    large = stacked.numel() >= _LARGE
    alone = torch.cat([torch.ops.mkldnn._linear_pointwise(x[r:r + 1], packed, bias, "none", [], "")
                       for r in range(_LARGE_ALONE if large else MAX_PACKED_ROWS)])  # [n, outs]: each row by itself
    for rows in _LARGE_COUNTS if large else range(1, MAX_PACKED_ROWS + 1):
        got = torch.ops.mkldnn._linear_pointwise(x[:rows], packed, bias, "none", [], "")
        want = torch.cat([F.linear(x[:rows], w, bias) for w in weights], dim=-1)
        if not (torch.equal(got, want) and torch.equal(got[:len(alone)], alone[:rows])):
            return False
    return True


# A weight of at least _LARGE elements (an LM head: ~0.1 s a check of every count) is checked at _LARGE_COUNTS
# rows, its first _LARGE_ALONE rows against each computed alone.
_LARGE = 1 << 22
_LARGE_COUNTS = (1, 2, 5, 16, MAX_PACKED_ROWS)
_LARGE_ALONE = 4
