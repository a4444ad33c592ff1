"""What `cecollm bench` runs: its settings and the strategies, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

from cecollm.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL
from cecollm.errors import UserError

DATASETS = ("alpaca", "xsum", "truthfulqa")
SPEED_DATASETS = ("alpaca", "xsum")  # the timing tables (Tables 2 and 4) run on these
DEFAULT_DATA_DIR = "../shared/data"  # beside a checkout; --data NAME=PATH overrides one file


@dataclass(frozen=True)
class Strategy:
    """One deployment strategy of the paper's tables."""

    name: str  # key in the raw files and --strategies
    label: str  # row label in the report
    kind: str  # "cloud" (whole model in the cloud) | "full" (stateless cloud, all rows each request) | "ce" (broker)
    threshold: float = 1.0  # exit confidence threshold (1.0: exits off)
    fp16: bool = True  # float16 hidden states on the wire
    standalone: bool = False  # the edge alone
    accuracy: bool = False  # part of the accuracy grid (also runs on TruthfulQA)
    exact: bool = False  # the exact mode: drafts the cloud verifies (the full model's output)


STRATEGIES = (
    Strategy("cloud", "Cloud-based LLM deployment", "cloud", fp16=False, accuracy=True),
    Strategy("naive", "Naive cloud-edge deployment", "full", 1.0, fp16=False),
    Strategy("standalone", "CE-CoLLM (standalone)", "ce", standalone=True),
    Strategy("ce-0.8", "CE-CoLLM (threshold=0.8)", "ce", 0.8, accuracy=True),
    Strategy("ce-0.9", "CE-CoLLM (threshold=0.9)", "ce", 0.9, accuracy=True),
    Strategy("ce-1.0", "CE-CoLLM (threshold=1.0)", "ce", 1.0, accuracy=True),
    Strategy("ce-0.8-fp32", "CE-CoLLM (threshold=0.8, float32)", "ce", 0.8, fp16=False, accuracy=True),
    Strategy("ce-0.9-fp32", "CE-CoLLM (threshold=0.9, float32)", "ce", 0.9, fp16=False, accuracy=True),
    Strategy("ce-1.0-fp32", "CE-CoLLM (threshold=1.0, float32)", "ce", 1.0, fp16=False, accuracy=True),
    Strategy("ce-0.8-nocm", "Without content manager & parallel upload (0.8)", "full", 0.8, fp16=True),
    Strategy("exact", "CE-CoLLM exact (threshold=0.8)", "ce", 0.8, accuracy=True, exact=True),
    Strategy("exact-fp32", "CE-CoLLM exact (threshold=0.8, float32)", "ce", 0.8, fp16=False, accuracy=True, exact=True),
)
BY_NAME = {s.name: s for s in STRATEGIES}

TABLE2 = ("cloud", "naive", "standalone", "ce-0.8", "ce-0.9", "ce-1.0")
# Table 4 rows: the reference, then each feature removed (no early exit = threshold 1.0, same run as ce-1.0)
TABLE4 = (("ce-0.8", "Our proposal (threshold=0.8)"), ("ce-0.8-fp32", "Without half precision transmission"),
          ("ce-1.0", "Without early exit mechanism"), ("ce-0.8-nocm", "Without content manager & parallel upload"))
# The reproduction's goals for CE-CoLLM at threshold 0.8 (the paper's figures per dataset, for the report).
GOALS = (
    ("total_vs_cloud", "total time vs cloud-based", "<=", 0.85, {"alpaca": 0.86, "xsum": 0.96}),
    ("cloud_vs_cloud", "cloud compute vs cloud-based", "<=", 0.30, {"alpaca": 0.30, "xsum": 0.15}),
    ("bytes_vs_naive", "bytes vs naive cloud-edge", "<=", 0.01, {"alpaca": 0.0085, "xsum": 0.0056}),
    ("rouge_vs_cloud", "ROUGE-L vs cloud-based output", ">=", 0.95, {"alpaca": 0.95, "xsum": 0.92}),
)
ACCURACY = ("ce-0.8-fp32", "ce-0.8", "ce-0.9-fp32", "ce-0.9", "ce-1.0-fp32", "ce-1.0", "exact-fp32", "exact", "cloud")
EXACT = ("exact", "exact-fp32")
# The exact mode's goals against cloud-based: output identical (float32 upload), total time, cloud compute.
EXACT_GOALS = (
    ("exact-fp32", "identical_to_cloud", "token-identical to cloud-based (fraction of prompts)", ">=", 1.0),
    ("exact", "total_vs_cloud", "total time vs cloud-based", "<=", 0.95),
    ("exact", "cloud_vs_cloud", "cloud compute vs cloud-based", "<=", 0.35),
)


@dataclass(frozen=True)
class BenchConfig:
    """One `cecollm bench` run; the click options take their defaults from here."""

    model: str = DEFAULT_MODEL  # a transformers directory, a .gguf file, or the default model's name
    heads: str = ""  # exit heads file; "" = the model's default heads
    exits: str = ""  # exits, "8,15"; "" = the model's default split
    n: int = 20  # prompts per dataset
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # tokens per generation at most
    link: str = "wifi"  # link emulator preset between edge and cloud
    datasets: tuple[str, ...] = DATASETS  # which data sets
    strategies: tuple[str, ...] = tuple(s.name for s in STRATEGIES)  # which strategies
    out: str = ""  # results directory; "" = results/bench-<link>
    data_dir: str = DEFAULT_DATA_DIR  # where alpaca.jsonl, xsum.jsonl, truthfulqa.jsonl are
    data_files: tuple[tuple[str, str], ...] = ()  # (dataset, path) overrides
    threads: int = 1  # torch threads on the edge and in each cloud process
    pin: bool = True  # edge on one core, cloud processes on another
    timeout: float = 120.0  # seconds one cloud request may take before the run fails
    scaling: tuple[int, ...] = (1, 2, 3, 4, 5)  # devices for the scaling section (fanout); () = skip

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UserError(f"--n must be at least 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.timeout > 0:
            raise UserError(f"--timeout must be more than 0 seconds, got {self.timeout:g}")
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        for d in self.datasets:
            if d not in DATASETS:
                raise UserError(f"unknown dataset {d!r}; choose from {', '.join(DATASETS)}")
        for s in self.strategies:
            if s not in BY_NAME:
                raise UserError(f"unknown strategy {s!r}; choose from {', '.join(BY_NAME)}")
        if not self.datasets or not self.strategies:
            raise UserError("nothing to run: give at least one dataset and one strategy")
        for d, _ in self.data_files:
            if d not in DATASETS:
                raise UserError(f"--data names unknown dataset {d!r}; choose from {', '.join(DATASETS)}")
        if any(k < 1 for k in self.scaling):
            raise UserError("--scaling takes device counts >= 1")

    @property
    def out_dir(self) -> str:
        return self.out or f"results/bench-{self.link}"

    def strategies_for(self, dataset: str) -> tuple[Strategy, ...]:
        """TruthfulQA is an accuracy set: only the accuracy grid runs on it."""
        chosen = [BY_NAME[s] for s in self.strategies]
        if dataset in SPEED_DATASETS:
            return tuple(chosen)
        return tuple(s for s in chosen if s.accuracy)
