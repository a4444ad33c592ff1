"""The benchmark's prompts: Alpaca instructions, XSum documents (summarise), TruthfulQA questions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cecollm.errors import UserError
from cecollm.prompting import read_numbered_records, record_prompt


@dataclass(frozen=True)
class Prompt:
    """One prompt of a data set, with what the accuracy metrics compare against."""

    dataset: str
    index: int  # line number in the file (0-based): the prompt's key in the raw results
    text: str  # the user's message (the chat template is applied when encoding)
    references: tuple[str, ...]  # XSum: the reference summary; TruthfulQA: the true answers; Alpaca: the output


def _prompt(dataset: str, index: int, record: dict) -> Prompt:
    try:
        if dataset == "alpaca":
            return Prompt(dataset, index, record_prompt({"instruction": record["instruction"], "input": record.get("input")}),
                          (record.get("output", ""),))
        if dataset == "xsum":
            return Prompt(dataset, index, record_prompt({"document": record["document"]}), (record["summary"],))
        if dataset == "truthfulqa":
            answers = record["answer"]
            answers = (answers,) if isinstance(answers, str) else tuple(answers)
            return Prompt(dataset, index, record["question"], answers)
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{dataset} record {index + 1} lacks a field ({exc})") from None
    raise AssertionError(f"unknown dataset {dataset}")


def read_prompts(dataset: str, path: str | Path) -> list[Prompt]:
    """Every prompt in a JSON-lines file of the data set's format."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {dataset} file at {path} (give --data-dir or --data {dataset}=PATH)")
    prompts = [_prompt(dataset, number - 1, record) for number, record in read_numbered_records(path)]
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def dataset_path(dataset: str, data_dir: str, overrides: tuple[tuple[str, str], ...]) -> Path:
    for name, path in overrides:
        if name == dataset:
            return Path(path)
    return Path(data_dir) / f"{dataset}.jsonl"
