"""The frozen configs of `cecollm train-exits` (no heavy imports: the CLI reads their defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

HOLDOUT = 30  # Alpaca records at the end of a file that are never used for training
DEFAULT_LR = {"norm": 5e-3, "adapter": 1e-3, "layer": 2e-4}


@dataclass(frozen=True)
class TrainConfig:
    """How the heads are trained; `cecollm train-exits` takes its defaults from here."""

    arch: str = "adapter"  # head architecture (see cecollm.edge.heads.head_architectures)
    arch_options: dict = field(default_factory=dict)  # e.g. {"rank": 64, "vocab": 8192}
    epochs: float = 2.0  # passes over the cached training rows
    batch_rows: int = 256  # rows (tokens) per optimizer step
    lr: float = 0.0  # peak learning rate; 0 = the architecture's default (DEFAULT_LR)
    weight_decay: float = 0.0  # AdamW weight decay of the heads' parameters
    greedy_weight: float = 0.5  # weight of cross-entropy to the final layer's greedy token (0 = pure KL; measured best)
    seed: int = 0  # heads' initialisation and data order
    max_minutes: float = 0.0  # stop training after this long (0 = no limit); the checkpoint stays
    checkpoint_every: int = 50  # optimizer steps between checkpoints

    def peak_lr(self) -> float:
        return self.lr or DEFAULT_LR.get(self.arch, 1e-3)


@dataclass(frozen=True)
class DataConfig:
    """What text the heads learn from; `cecollm train-exits` takes its defaults from here."""

    data: tuple[str, ...] = ()  # training files (jsonl or text)
    eval_data: tuple[str, ...] = ()  # extra evaluation files (all of their records), e.g. self-answers
    holdout: int = HOLDOUT  # the last records of every Alpaca-format file are evaluation only
    max_len: int = 512  # tokens per sequence at most (long prompts keep their end)
    top_k: int = 32  # teacher probabilities cached per token
    max_tokens: int = 0  # token budget of the teacher pass over the training text (0 = all)
    cache: str = ""  # cache directory ("" = one under $CECOLLM_HOME/exit-cache per settings)
    cache_layers: tuple[int, ...] = field(default_factory=tuple)  # extra layers to cache for later runs
