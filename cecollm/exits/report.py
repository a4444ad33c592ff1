"""`cecollm exits-report`: generation at several thresholds against threshold 1.0 (no exits).

For each threshold, over the prompts: the share of tokens each exit decided, agreement with
the full model (each generated token against the full model's greedy choice after the same
text, checked by one teacher-forced pass), whether the output is the threshold-1.0 output
token for token, ROUGE-L of the text against the threshold-1.0 text, and the edge and cloud
compute per token (SplitEngine's seconds in collab mode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cecollm.config import GenerationConfig
from cecollm.engine import SplitEngine
from cecollm.errors import UserError
from cecollm.exits.config import HOLDOUT
from cecollm.exits.data import is_alpaca, split_records
from cecollm.prompting import read_records, record_prompt

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def read_prompts(path: str | Path, part: str = "heldout", holdout: int = HOLDOUT) -> list[tuple[str, str]]:
    """(source, prompt) pairs: held-out Alpaca records, or every record / line of another file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    if path.suffix not in (".jsonl", ".json"):
        lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        return [(f"{path.name}:{i}", l) for i, l in enumerate(lines)]
    records = read_records(path)
    if is_alpaca(records):
        chosen = split_records(records, part, holdout) if part != "all" else list(enumerate(records))
        return [(f"{path.name}:{i}", record_prompt(r)) for i, r in chosen]
    out = []
    for i, r in enumerate(records):
        text = r.get("prompt") or r.get("question") or r.get("text")
        if not text:
            raise UserError(f"{path}:{i + 1}: no prompt, question, instruction or text field")
        out.append((f"{path.name}:{i}", text))
    return out


@dataclass
class ThresholdRow:
    threshold: float
    tokens: int = 0
    by_exit: dict = field(default_factory=dict)  # exit -> tokens it decided
    agree: int = 0  # tokens equal to the full model's greedy choice after the same text
    match: int = 0  # tokens equal to the threshold-1.0 output at the same index
    identical: int = 0  # prompts whose output equals the threshold-1.0 output
    rouge: list = field(default_factory=list)  # ROUGE-L F1 per prompt against threshold 1.0
    edge_s: float = 0.0
    cloud_s: float = 0.0

    def summary(self, exits) -> dict:
        n = max(self.tokens, 1)
        edge = sum(self.by_exit.values())
        return {
            "threshold": self.threshold, "tokens": self.tokens,
            "edge_share": round(edge / n, 4),
            "exit_share": {str(e): round(self.by_exit.get(e, 0) / n, 4) for e in exits},
            "agreement": round(self.agree / n, 4), "match_t1": round(self.match / n, 4),
            "identical_outputs": self.identical, "rouge_l": round(sum(self.rouge) / max(len(self.rouge), 1), 4),
            "edge_ms_per_token": round(1000 * self.edge_s / n, 2), "cloud_ms_per_token": round(1000 * self.cloud_s / n, 2),
        }


@torch.inference_mode()
def _full_model_choices(model, prompt_ids: list[int], token_ids: list[int]) -> list[int]:
    """The full model's greedy token after prompt + token_ids[:i], for every i (one pass)."""
    ids = torch.tensor([prompt_ids + token_ids[:-1]])
    logits = model(ids).logits[0, len(prompt_ids) - 1:]  # [len(token_ids), vocab]
    return logits.argmax(-1).tolist()


def run_report(loaded, split, heads, prompts, max_new_tokens: int, thresholds=THRESHOLDS) -> dict:
    from rouge_score import rouge_scorer

    from cecollm.prompting import encode_prompt

    if 1.0 not in thresholds:
        thresholds = tuple(thresholds) + (1.0,)
    engine = SplitEngine(loaded.model, split, heads)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rows = {t: ThresholdRow(t) for t in thresholds}
    tok = loaded.tokenizer
    order = sorted(thresholds, reverse=True)  # 1.0 first: the reference
    for _source, prompt in tqdm(prompts, desc="exits-report", unit="prompt"):
        ids = encode_prompt(tok, prompt)
        ref_ids, ref_text, ref_choices = None, None, None
        for t in order:
            result = engine.generate(ids, GenerationConfig(mode="collab", threshold=t, max_new_tokens=max_new_tokens))
            out = result.token_ids
            text = tok.decode(out, skip_special_tokens=True)
            if ref_ids is None:
                # The threshold-1.0 output is not the full model's by definition (float16 upload
                # rounds), so its agreement is measured like every other output's.
                ref_ids, ref_text = out, text
                ref_choices = _full_model_choices(loaded.model, ids, out)
            row = rows[t]
            row.tokens += len(out)
            for rec in result.tokens:
                if rec.decided_by != "cloud":
                    row.by_exit[rec.decided_by] = row.by_exit.get(rec.decided_by, 0) + 1
            choices = ref_choices if out == ref_ids else _full_model_choices(loaded.model, ids, out)
            row.agree += sum(a == b for a, b in zip(out, choices))
            row.match += sum(a == b for a, b in zip(out, ref_ids))
            row.identical += out == ref_ids
            same = out == ref_ids or text.strip() == ref_text.strip()
            row.rouge.append(1.0 if same else scorer.score(ref_text, text)["rougeL"].fmeasure)
            row.edge_s += result.stats.edge_seconds
            row.cloud_s += result.stats.cloud_seconds
    return {
        "exits": list(split.exits), "upload_layer": split.upload_layer, "n_layers": split.n_layers,
        "prompts": [s for s, _ in prompts], "max_new_tokens": max_new_tokens,
        "heads": {"arch": heads.arch, "options": heads.arch_options},
        "rows": [rows[t].summary(split.exits) for t in sorted(thresholds)],
    }


def format_table(report: dict) -> str:
    exits = report["exits"]
    head = ["threshold", "edge %"] + [f"exit {e} %" for e in exits] + [
        "agree", "= t1.0", "ROUGE-L", "edge ms/tok", "cloud ms/tok", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [f"{r['threshold']:.2f}", f"{100 * r['edge_share']:.1f}"]
        cells += [f"{100 * r['exit_share'][str(e)]:.1f}" for e in exits]
        cells += [f"{r['agreement']:.3f}", f"{r['match_t1']:.3f}", f"{r['rouge_l']:.3f}",
                  f"{r['edge_ms_per_token']:.1f}", f"{r['cloud_ms_per_token']:.1f}", str(r["tokens"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ts = [r["threshold"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(rows)
    for e in report["exits"]:
        share = [r["exit_share"][str(e)] for r in rows]
        a.bar(ts, share, width=0.06, bottom=bottom, label=f"exit {e}")
        bottom = [x + y for x, y in zip(bottom, share)]
    a.plot(ts, [r["rouge_l"] for r in rows], "k-o", label="ROUGE-L vs t=1.0")
    a.plot(ts, [r["agreement"] for r in rows], "r--s", label="agreement with full model")
    a.axhline(0.5, color="grey", lw=0.5)
    a.set_xlabel("threshold")
    a.set_ylim(0, 1.05)
    a.set_title("tokens decided on the edge")
    a.legend(fontsize=8)
    b.plot(ts, [r["edge_ms_per_token"] for r in rows], "b-o", label="edge")
    b.plot(ts, [r["cloud_ms_per_token"] for r in rows], "g-o", label="cloud")
    b.set_xlabel("threshold")
    b.set_ylabel("ms per generated token")
    b.set_title("compute per token")
    b.legend(fontsize=8)
    fig.suptitle(f"exits {','.join(map(str, report['exits']))} of {report['n_layers']}, {len(report['prompts'])} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "exits-report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "exits-report.md").write_text(
        f"exits {report['exits']} of {report['n_layers']} layers, {len(report['prompts'])} prompts, "
        f"max {report['max_new_tokens']} new tokens\n\n" + format_table(report) + "\n")
    plot(report, out_dir / "exits-report.png")
