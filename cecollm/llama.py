"""Llama models without transformers: our own modules, loaded straight from a converted directory.

Importing transformers and building a model through it takes ~2.5 s of a start; a run only needs
the weights in modules with the names and attributes layers.DecoderRunner and the heads read. The
modules here compute what transformers' LlamaForCausalLM computes, operation for operation
(tests/test_llama.py checks the logits bit for bit against transformers). transformers stays for
converting GGUF files, for the exit-head tools and as the reference in tests.

Only what the directory's config says plainly is built here (LlamaForCausalLM, SiLU, the default
rotary embedding); for anything else load_native() returns None and the caller uses transformers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from cecollm.errors import UserError

_CONFIG_DEFAULTS = {  # LlamaConfig's defaults, for keys a config.json may leave out
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
}


class LlamaConfig:
    """A config.json as attributes (what code reads of transformers' LlamaConfig)."""

    def __init__(self, values: dict) -> None:
        self.__dict__.update(_CONFIG_DEFAULTS)
        self.__dict__.update(values)
        if self.__dict__.get("num_key_value_heads") is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.__dict__.get("head_dim") is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.__dict__.get("rope_parameters") is None:  # a config.json written before transformers 5
            scaling = self.__dict__.get("rope_scaling") or {}
            self.rope_parameters = {"rope_theta": self.__dict__.get("rope_theta", 10000.0),
                                    "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}

    def __repr__(self) -> str:
        return f"LlamaConfig({self.__dict__})"


class GenerationDefaults:
    """The token ids of generation_config.json (else of config.json) that eos_ids() reads."""

    def __init__(self, config: LlamaConfig, values: dict) -> None:
        self.bos_token_id = values.get("bos_token_id", config.bos_token_id)
        self.eos_token_id = values.get("eos_token_id", config.eos_token_id)
        self.pad_token_id = values.get("pad_token_id", config.pad_token_id)


class Linear(nn.Linear):
    """nn.Linear that skips the random initialisation: the weights come from the file (and on the meta
    device torch's init functions import torch._dynamo, a second of a start)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without the random initialisation, as Linear."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """LlamaRotaryEmbedding with the default rope type."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.rope_type = "default"
        self.attention_scaling = 1.0
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        # on the CPU even while the model is built on the meta device (not in the file: built for real)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class Attention(nn.Module):
    """LlamaAttention's weights and constants (layers.DecoderRunner runs them)."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias, hidden, hd = config.attention_bias, config.hidden_size, config.head_dim
        self.q_proj = Linear(hidden, config.num_attention_heads * hd, bias=bias)
        self.k_proj = Linear(hidden, config.num_key_value_heads * hd, bias=bias)
        self.v_proj = Linear(hidden, config.num_key_value_heads * hd, bias=bias)
        self.o_proj = Linear(config.num_attention_heads * hd, hidden, bias=bias)


class MLP(nn.Module):
    """LlamaMLP with SiLU."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """The modules of transformers' LlamaForCausalLM under the same names (the state dict's keys are its keys)."""

    def __init__(self, config: LlamaConfig, generation: dict | None = None) -> None:
        super().__init__()
        self.config = config
        self.generation_config = GenerationDefaults(config, generation or {})
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (as transformers' model.dtype)."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device


def native_config(model_dir: Path) -> LlamaConfig | None:
    """The directory's config when our modules can build its model, else None."""
    try:
        values = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: cannot read config.json ({exc})") from None
    if values.get("model_type") != "llama" or "LlamaForCausalLM" not in (values.get("architectures") or []):
        return None
    config = LlamaConfig(values)
    if config.hidden_act != "silu" or config.rope_parameters.get("rope_type", "default") != "default":
        return None
    if config.__dict__.get("pretraining_tp", 1) != 1:
        return None
    return config


def load_native(model_dir: Path, mapped: bool = False, dtype: torch.dtype = torch.float32,
                files: list[Path] | None = None) -> nn.Module | None:
    """The model of a converted directory in our modules, eval mode (None: use transformers).

    `mapped`: parameters over a copy-on-write map of the safetensors file (shared between
    processes; see weights.py), else read into memory (and converted to `dtype`). `files`: the
    safetensors files to load (a mapped model in another dtype: the converted copies); default the
    directory's.
    """
    from cecollm.weights import assign_weights, map_safetensors

    model_dir = Path(model_dir)
    config = native_config(model_dir)
    if config is None:
        return None
    files = files or sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: cannot load the weights (no .safetensors file)")
    generation = {}
    if (model_dir / "generation_config.json").is_file():
        generation = json.loads((model_dir / "generation_config.json").read_text())
    with torch.device("meta"):
        model = LlamaForCausalLM(config, generation)
    state = {}
    try:
        for file in files:
            state.update(map_safetensors(file) if mapped else _read_safetensors(file))
    except (OSError, ValueError, struct.error) as exc:  # a damaged file
        raise UserError(f"{model_dir}: cannot load the weights ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if any(t.dtype != dtype for t in state.values()):
        if mapped:
            raise UserError(f"{model_dir}: weights are not {str(dtype).removeprefix('torch.')}; convert the model first")
        state = {k: t.to(dtype) for k, t in state.items()}
    assign_weights(model, state, config.tie_word_embeddings, model_dir)
    return model.eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as exc:
        raise ValueError(str(exc)) from None
