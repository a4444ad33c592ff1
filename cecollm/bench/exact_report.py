"""The exact mode's section of report.md: where its time goes, against cloud-based and the paper's mode."""

from __future__ import annotations

from cecollm.bench.config import BY_NAME, EXACT, SPEED_DATASETS


def _f(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_exact(results: dict) -> list[str]:
    """A table per timing dataset with an exact row: total, edge, waiting, wasted, roll-backs, verification."""
    rows = []
    for dataset in SPEED_DATASETS:
        strategies = results["datasets"].get(dataset, {}).get("strategies", {})
        for name in EXACT:
            a = strategies.get(name)
            if not a:
                continue
            tokens = a["tokens"] or 1
            verify_ms = 1000 * a["verify_s"] / a["verifies"] if a["verifies"] else None
            rows.append([dataset, BY_NAME[name].label, _f(a["total_s"]), _f(a.get("total_vs_cloud")),
                         _f(a["edge_s"]), _f(a["waiting_s"]), _f(a["wasted_s"]), _f(a["cloud_s"]),
                         _f(a.get("cloud_vs_cloud")), f"{a['drafts']}", f"{a['rollbacks']} ({a['rollbacks'] / tokens:.0%})",
                         _f(verify_ms, 1), f"{a.get('identical_to_cloud', 0) or 0:.0%}"])
    if not rows:
        return []
    header = ["Dataset", "Strategy", "Total (s)", "Total / cloud-based", "Edge (s)", "Waiting (s)", "Wasted (s)",
              "Cloud (s)", "Cloud / cloud-based", "Drafts", "Roll-backs (per token)", "Verification (ms)",
              "Identical to cloud-based"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]
    return ["## Exact collaboration: where the time goes", "",
            "The edge drafts every token and goes on; the cloud checks each draft one row later. Edge is all edge "
            "compute (wasted included); waiting is the edge idle for a verdict (the end of a generation, or a "
            "token it chose to wait for); wasted is edge compute on drafts that were rolled back; verification "
            "is the mean time from a VERIFY to its verdict.", "", *table, ""]
