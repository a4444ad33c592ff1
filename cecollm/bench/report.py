"""From raw records to results.json: sums per (dataset, strategy) on a common prompt set, ratios, goals.

Sums are over the prompts every selected strategy of a dataset finished (the paper reports
cumulative times over all cases). Output is compared with the cloud-based output of the same
prompt: ROUGE-L (rouge-score, stemmed) and whether the token ids are identical.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cecollm.bench.config import ACCURACY, BY_NAME, EXACT_GOALS, GOALS, SPEED_DATASETS, BenchConfig
from cecollm.bench.explain import add_explanations
from cecollm.errors import UserError

log = logging.getLogger(__name__)

EXACT_SUMMED = ("drafts", "rollbacks", "verifies", "verify_s", "waiting_s", "wasted_s")  # the exact mode's records
SUMMED = ("total_s", "edge_s", "cloud_s", "comm_s", "cloud_requests", "edge_tokens", "fallback_tokens",
          "wire_up", "wire_down", "app_up", "app_down", "prompt_tokens")


class RougeL:
    """ROUGE-L F-measure; two identical texts score 1.0 (rouge-score gives 0.0 when both have no words)."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def __call__(self, reference: str, output: str) -> float:
        if reference == output:
            return 1.0
        return self._scorer.score(reference, output)["rougeL"].fmeasure


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def aggregate_dataset(dataset: str, indices: list[int], names: list[str], records: dict, rouge: RougeL,
                      references: dict[int, tuple[str, ...]]) -> dict:
    """Sums and ratios of each strategy over the prompts all of `names` finished."""
    common = [i for i in indices if all((dataset, n, i) in records for n in names)]
    out = {"prompts": common, "strategies": {}}
    cloud_ref = {i: records[(dataset, "cloud", i)] for i in common} if "cloud" in names else {}
    for name in names:
        recs = [records[(dataset, name, i)] for i in common]
        agg = {k: sum(r[k] for r in recs) for k in SUMMED}
        agg["tokens"] = sum(len(r["token_ids"]) for r in recs)
        # time on the wire as the link measured it (records from before it was measured have none)
        agg["wire_s"] = sum(r["wire_s"] for r in recs) if all("wire_s" in r for r in recs) else None
        agg["wire_bytes"] = agg["wire_up"] + agg["wire_down"]
        agg["problems"] = [f"#{r['index']}: {p}" for r in recs for p in r["problems"]]
        if BY_NAME[name].exact:
            agg.update({k: sum(r[k] for r in recs) for k in EXACT_SUMMED})
        kind = BY_NAME[name].kind
        agg["cloud_request_rate"] = None if kind == "cloud" else _ratio(agg["cloud_requests"], agg["tokens"])
        if cloud_ref:
            pairs = [(cloud_ref[r["index"]], r) for r in recs]
            agg["rouge_vs_cloud"] = _mean(rouge(c["text"], r["text"]) for c, r in pairs)
            agg["identical_to_cloud"] = _mean(float(c["token_ids"] == r["token_ids"]) for c, r in pairs)
        if dataset == "xsum":
            agg["rouge_vs_reference"] = _mean(rouge(references[r["index"]][0], r["text"]) for r in recs)
        if dataset == "truthfulqa":
            agg["max_rouge_vs_true_answers"] = _mean(max(rouge(a, r["text"]) for a in references[r["index"]])
                                                     for r in recs)
        out["strategies"][name] = agg
    base, naive = out["strategies"].get("cloud"), out["strategies"].get("naive")
    for agg in out["strategies"].values():
        if base:
            agg["total_vs_cloud"] = _ratio(agg["total_s"], base["total_s"])
            agg["cloud_vs_cloud"] = _ratio(agg["cloud_s"], base["cloud_s"])
        if naive:
            agg["total_vs_naive"] = _ratio(agg["total_s"], naive["total_s"])
            agg["bytes_vs_naive"] = _ratio(agg["wire_bytes"], naive["wire_bytes"])
    return out


def check_goals(datasets: dict) -> list[dict]:
    """The reproduction's goals for CE-CoLLM at 0.8, per timing dataset, with pass/miss and the margin."""
    goals = []
    for dataset in SPEED_DATASETS:
        strategies = datasets.get(dataset, {}).get("strategies", {})
        ce = strategies.get("ce-0.8")
        for key, what, op, target, paper in GOALS:
            value = ce.get(key) if ce else None
            goals.append(_goal(dataset, f"CE-CoLLM 0.8: {what}", value, op, target, paper.get(dataset)))
        for name in ("ce-1.0-fp32", "ce-1.0"):
            if name in strategies and strategies[name].get("identical_to_cloud") is not None:
                goal = _goal(dataset, f"{name}: token-identical to cloud-based (fraction of prompts)",
                             strategies[name]["identical_to_cloud"], ">=", 1.0, 1.0)
                if name == "ce-1.0" and goal["status"] == "miss":
                    goal["note"] = "float16 on the wire is lossy: a flip here is expected now and then, not a bug"
                goals.append(goal)
        for name, key, what, op, target in EXACT_GOALS:
            if name in strategies:
                goals.append(_goal(dataset, f"{name}: {what}", strategies[name].get(key), op, target, None))
    return goals


def _goal(dataset, what, value, op, target, paper) -> dict:
    if value is None:
        return {"dataset": dataset, "goal": what, "target": f"{op} {target:g}", "paper": paper, "value": None,
                "status": "not measured", "margin": None}
    ok = value <= target if op == "<=" else value >= target
    return {"dataset": dataset, "goal": what, "target": f"{op} {target:g}", "paper": paper, "value": value,
            "status": "pass" if ok else "miss", "margin": value - target}


def build_results(config: BenchConfig, prompts: dict, records: dict, meta: dict) -> dict:
    rouge = RougeL()
    datasets = {}
    for dataset, picked in prompts.items():
        names = [s.name for s in config.strategies_for(dataset)]
        references = {p.index: p.references for p, _ in picked}
        datasets[dataset] = aggregate_dataset(dataset, [p.index for p, _ in picked], names, records, rouge,
                                              references)
    loads = [r["load_1m"] for r in records.values() if "load_1m" in r]
    meta["load_average"] = {"mean": _mean(loads), "max": max(loads), "cores": meta.get("cpu_count")} if loads else None
    accuracy = {name: {"xsum": datasets.get("xsum", {}).get("strategies", {}).get(name, {}).get("rouge_vs_reference"),
                       "truthfulqa": datasets.get("truthfulqa", {}).get("strategies", {}).get(name, {})
                       .get("max_rouge_vs_true_answers")}
                for name in ACCURACY if name in config.strategies}
    return {"meta": meta, "datasets": datasets, "accuracy": accuracy, "goals": check_goals(datasets)}


def write_outputs(config: BenchConfig, prompts: dict, records: dict, meta: dict) -> Path:
    """results.json, report.md and the plots in the run's directory; the directory."""
    from cecollm.bench.scaling import run_scaling_section

    out = Path(config.out_dir)
    results = build_results(config, prompts, records, meta)
    results["scaling"] = run_scaling_section(config, out)
    add_explanations(results)
    return _write(out, results)


def rewrite_report(out_dir: str | Path) -> Path:
    """Rewrite report.md, the plots and results.json's explanations from results.json alone (no raw/ needed)."""
    out = Path(out_dir)
    path = out / "results.json"
    results = _read_results(path)
    try:
        add_explanations(results)
        return _write(out, results)
    except KeyError as exc:
        raise UserError(f"{path} lacks {exc}, which the report needs; was it written by another version of "
                        "cecollm bench?") from None


def _read_results(path: Path) -> dict:
    """results.json, checked for the shape the report reads; a UserError in one line otherwise."""
    def refuse_constant(name):  # NaN and Infinity: results.json never holds them
        raise ValueError(f"{name} is not a number results.json may hold")

    try:
        results = json.loads(path.read_text(), parse_constant=refuse_constant)
    except FileNotFoundError:
        raise UserError(f"no results.json in {path.parent}: run cecollm bench into it first") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    shape = {"meta": dict, "datasets": dict, "accuracy": dict, "goals": list, "scaling": dict}
    ok = isinstance(results, dict) and all(isinstance(results.get(k), t) for k, t in shape.items())
    ok = ok and all(isinstance(results["meta"].get(k), dict) for k in ("settings", "config"))
    ok = ok and all(isinstance(ds, dict) and isinstance(ds.get("strategies"), dict)
                    and isinstance(ds.get("prompts"), list) for ds in results["datasets"].values())
    ok = ok and all(isinstance(a, dict) for ds in results["datasets"].values() for a in ds["strategies"].values())
    if not ok:
        raise UserError(f"{path} is not a results.json written by cecollm bench")
    return results


def _write(out: Path, results: dict) -> Path:
    """results.json, report.md and the plots in `out`; `out`."""
    from cecollm.bench.markdown import render_report
    from cecollm.bench.plots import plot_breakdown, plot_scaling

    try:
        plots = [p for p in (plot_breakdown(results, out / "time_breakdown.png"),
                             plot_scaling(results["scaling"], out / "scaling.png")) if p]
        results["plots"] = [p.name for p in plots]
        (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
        (out / "report.md").write_text(render_report(results))
    except OSError as exc:
        raise UserError(f"cannot write the report into {out}: {exc}") from None
    return out
