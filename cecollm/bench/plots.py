"""PNG plots of a bench run (matplotlib, Agg backend): time breakdown per strategy; time vs devices."""

from __future__ import annotations

from pathlib import Path

from cecollm.bench.config import BY_NAME, STRATEGIES

PARTS = (("edge_s", "edge compute", "#4c72b0"), ("cloud_s", "cloud compute", "#dd8452"),
         ("comm_s", "communication", "#55a868"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_breakdown(results: dict, path: Path) -> Path | None:
    """Stacked horizontal bars (edge, cloud, comm, other) per strategy, one panel per timing dataset."""
    datasets = [(n, d) for n, d in results["datasets"].items() if n in ("alpaca", "xsum") and d["prompts"]]
    if not datasets:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4.5), squeeze=False)
    order = [s.name for s in STRATEGIES]
    for ax, (name, ds) in zip(axes[0], datasets):
        keys = [k for k in order if k in ds["strategies"]][::-1]
        left = [0.0] * len(keys)
        for field, label, color in PARTS:
            values = [ds["strategies"][k][field] for k in keys]
            ax.barh(range(len(keys)), values, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, values)]
        other = [max(0.0, ds["strategies"][k]["total_s"] - l) for k, l in zip(keys, left)]
        ax.barh(range(len(keys)), other, left=left, color="#bbbbbb", label="other (client overhead)")
        ax.set_yticks(range(len(keys)), [BY_NAME[k].label for k in keys], fontsize=8)
        ax.set_xlabel(f"seconds, sum over {len(ds['prompts'])} prompts")
        ax.set_title(name)
        if any(ds["strategies"][k]["total_s"] > 20 * min(ds["strategies"][j]["total_s"] or 1 for j in keys)
               for k in keys):
            ax.set_xscale("log")
            ax.set_xlabel(ax.get_xlabel() + " (log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scaling(scaling: dict, path: Path) -> Path | None:
    """Wall time against the number of devices, per dataset and strategy; None without data."""
    rows = [r for r in scaling.get("rows", []) if not r.get("error") and r.get("wall_seconds") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for dataset in sorted({r["dataset"] for r in rows}):
        for kind, style in (("ce-0.8", "-o"), ("cloud", "--s")):
            pts = sorted((r["devices"], r["wall_seconds"]) for r in rows
                         if r["dataset"] == dataset and r["kind"] == kind)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{dataset}: {BY_NAME[kind].label}")
    ax.set_xlabel("devices at once")
    ax.set_ylabel("wall time until all devices finished (s)")
    ax.set_xticks(sorted({r["devices"] for r in rows}))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
