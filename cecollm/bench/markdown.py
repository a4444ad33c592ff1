"""report.md: the paper's Tables 2, 3 and 4 from results.json, the goal check, scaling, notes."""

from __future__ import annotations

from cecollm.bench.config import ACCURACY, BY_NAME, TABLE2, TABLE4
from cecollm.bench.exact_report import render_exact

MB = 1e6


def _f(value, digits=3, suffix="") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _table2(name: str, ds: dict) -> list[str]:
    s = ds["strategies"]
    rows = []
    for key in [k for k in TABLE2 if k in s] + [k for k in s if k not in TABLE2 and k != "ce-0.8-nocm"]:
        a = s[key]
        rows.append([BY_NAME[key].label, _f(a["total_s"]), _f(a["edge_s"]), _f(a["cloud_s"]), _f(a["comm_s"]),
                     _f(a.get("wire_s")), _pct(a["cloud_request_rate"]), _f(a["wire_up"] / MB, 3), _f(a["wire_down"] / MB, 3),
                     _f(a.get("rouge_vs_cloud"), 4), _pct(a.get("identical_to_cloud")), str(a["tokens"]),
                     _f(a.get("total_vs_cloud"), 2), _f(a.get("cloud_vs_cloud"), 2), _f(a.get("bytes_vs_naive"), 4)])
    header = ["Strategy", "Total (s)", "Edge (s)", "Cloud (s)", "Comm (s)", "On the wire (s)", "Cloud request rate", "Up (MB)",
              "Down (MB)", "ROUGE-L vs cloud", "Identical ids", "Tokens", "Total / cloud-based",
              "Cloud / cloud-based", "Bytes / naive"]
    return [f"### {name} ({len(ds['prompts'])} prompts)", "", *_table(header, rows), ""]


def _table4(name: str, ds: dict) -> list[str]:
    s = ds["strategies"]
    ref = s.get("ce-0.8")
    rows = []
    for key, label in TABLE4:
        if key not in s:
            continue
        a = s[key]
        rel = 100 * a["total_s"] / ref["total_s"] if ref and ref["total_s"] else None
        rows.append([label, _f(a["total_s"]), _f(a["edge_s"]), _f(a["cloud_s"]), _f(a["comm_s"]),
                     _f((a["wire_up"] + a["wire_down"]) / MB, 3), _f(rel, 2)])
    if not rows:
        return []
    header = ["Condition", "Total (s)", "Edge (s)", "Cloud (s)", "Comm (s)", "Bytes (MB)", "Relative total (%)"]
    return [f"### {name}", "", *_table(header, rows), ""]


def _render_ablation_notes(results: dict) -> list[str]:
    lines = [f"- {name}: {line}" for name, ds in results["datasets"].items()
             for line in ds.get("ablation_explanation") or []]
    return ["### What each removal shows", "", *lines, ""] if lines else []


def _table3(results: dict) -> list[str]:
    acc = results["accuracy"]
    rows = [[BY_NAME[k].label + (" (float32)" if k == "cloud" else ""), _f(acc[k]["truthfulqa"], 4),
             _f(acc[k]["xsum"], 4)] for k in ACCURACY if k in acc]
    if not rows:
        return []
    n = {d: len(results["datasets"].get(d, {}).get("prompts", [])) for d in ("truthfulqa", "xsum")}
    return ["## Accuracy (the paper's Table 3, scaled down)", "",
            f"TruthfulQA ({n['truthfulqa']} questions): mean over questions of the best ROUGE-L F between the "
            "answer and any of the true answers (exact match suits a 7B model's short answers, not a small "
            "model's free text). XSum "
            f"({n['xsum']} documents): mean ROUGE-L F against the reference summary. CE-CoLLM rows without "
            "\"float32\" send float16.", "",
            *_table(["Condition", "TruthfulQA (max ROUGE-L vs true answers)", "XSum (ROUGE-L vs reference)"], rows),
            ""]


def _goals(results: dict) -> list[str]:
    rows = []
    for g in results["goals"]:
        margin = "" if g["margin"] is None else f"{g['margin']:+.4f}"
        rows.append([g["dataset"], g["goal"], g["target"], _f(g["value"], 4), _f(g["paper"], 4),
                     f"**{g['status']}**", margin])
    lines = ["## Goal check (issue 5)", "",
             *_table(["Dataset", "Goal", "Target", "Measured", "Paper", "Status", "Measured - target"], rows), ""]
    for name, ds in results["datasets"].items():
        if ds.get("explanation"):
            lines += [f"- {name}, time: {ds['explanation']}"]
        if ds.get("bytes_explanation"):
            lines += [f"- {name}, bytes: {ds['bytes_explanation']}"]
        if ds.get("rouge_explanation"):
            lines += [f"- {name}, output: {ds['rouge_explanation']}"]
    notes = [g for g in results["goals"] if g.get("note")]
    lines += [f"- {g['dataset']} {g['goal']}: {g['note']}" for g in notes]
    return lines + [""]


def _scaling(scaling: dict) -> list[str]:
    lines = ["## Scaling: 1..K devices", "", f"Status: {scaling['status']}.", ""]
    rows = []
    for r in scaling["rows"]:
        if r.get("error"):
            rows.append([r["dataset"], r["kind"], str(r["devices"]), "failed", "", "", r["error"][:80]])
            continue
        rows.append([r["dataset"], r["kind"], str(r["devices"]), _f(r.get("wall_seconds")),
                     _f(r.get("cloud_seconds")),
                     _f(r.get("latency_p50_ms"), 1) + " / " + _f(r.get("latency_p99_ms"), 1),
                     str(r.get("errors", 0))])
    if rows:
        lines += ["CE-CoLLM 0.8: fanout replay of a recorded edge trace (the edge's compute slept, the cloud's "
                  "real); cloud-based: K concurrent devices against the one-core baseline cloud.", "",
                  *_table(["Dataset", "Strategy", "Devices", "Wall (s)", "Cloud (s)", "Request p50 / p99 (ms)",
                           "Errors"], rows), ""]
    lines += [f"- {line}" for line in scaling.get("explanation") or []]
    return lines + ([""] if scaling.get("explanation") else [])


def _load_note(meta: dict) -> list[str]:
    load = meta.get("load_average")
    if not load:
        return []
    return [f"Load average (1 min) of the machine ({load['cores']} cores) after each generation: mean "
            f"{load['mean']:.2f}, max {load['max']:.2f}. The benchmark itself keeps about 2 busy; more means other "
            "work shared the cores and the times are noisy.", ""]


def render_report(results: dict) -> str:
    meta = results["meta"]
    st = meta["settings"]
    cfg = meta["config"]
    lines = ["# cecollm bench", "",
             f"Model {st['model']} ({st['identity'][:12]}), {st['split']}, heads {st['heads']}; link {st['link']}; "
             f"at most {st['max_new_tokens']} new tokens; {cfg['n']} prompts per dataset asked; torch threads "
             f"{st['threads']}; {meta['cores']}.", "",
             *_load_note(meta),
             "Times are sums over the prompts (as the paper's tables). Total is wall time at the edge per "
             "generation; edge and cloud are compute; comm is measured at the edge: request to reply minus the "
             "compute the cloud reports (for CE-CoLLM this includes waiting for rows still in flight). On the wire "
             "is measured by the link emulator as it delivers: wall time during which the link carried bytes in "
             "either direction (parallel uploads count although they overlap edge compute). Bytes are "
             "what the link emulator carried (TCP payload, both directions). ROUGE-L and identical ids compare "
             "each output with the cloud-based output of the same prompt.", "",
             "## Speed (the paper's Table 2)", ""]
    for name, ds in results["datasets"].items():
        if name in ("alpaca", "xsum"):
            lines += _table2(name, ds)
    ablation = [line for name, ds in results["datasets"].items() if name in ("alpaca", "xsum")
                for line in _table4(name, ds)]
    if ablation:
        lines += ["## Ablation at threshold 0.8 (the paper's Table 4)", "",
                  "\"Without early exit\" is the threshold-1.0 run (float16, content manager on). \"Without "
                  "content manager\" sends every row so far with each request, synchronously, to a stateless "
                  "cloud.", "", *ablation, *_render_ablation_notes(results)]
    lines += render_exact(results)
    lines += _table3(results)
    lines += _goals(results)
    lines += _scaling(results["scaling"])
    problems = [(n, k, p) for n, ds in results["datasets"].items() for k, a in ds["strategies"].items()
                for p in a["problems"]]
    lines += ["## Notes", ""]
    skipped = {d: c for d, c in meta["skipped_too_long"].items() if c}
    if skipped:
        lines.append(f"- prompts skipped as too long for the positions available: {skipped}")
    lines.append(f"- generations with problems (timeouts, fallbacks): {len(problems)}")
    lines += [f"  - {n} {k} {p}" for n, k, p in problems[:10]]
    lines += [f"- plots: {', '.join(results.get('plots', [])) or 'none'}", ""]
    return "\n".join(lines)
