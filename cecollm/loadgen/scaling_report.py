"""The scaling benchmark's report: the table per point, batched/unbatched ratios, the largest device count
served under the latency target, report.md and a plot (matplotlib; skipped with a note when missing)."""

from __future__ import annotations

from pathlib import Path

MIB = 2**20


def _f(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _histogram(h: dict | None) -> str:
    """"1:40 2:12 4:3" (upper bound: batches in the bucket), or n/a when the broker has no batch metric."""
    if h is None:
        return "n/a"
    return " ".join(f"{le}:{n}" for le, n in h.items()) or "-"


def _ok(row: dict) -> bool:
    """The point ran and every request got its recorded token in time."""
    return "failed" not in row and not row["errors"] and not row["timeouts"] and not row["mismatches"]


def pair(rows: list[dict], devices: int) -> tuple[dict | None, dict | None]:
    """(unbatched, batched) rows at a device count (None where missing or failed)."""
    found = {r["mode"]: r for r in rows if r["devices"] == devices and "failed" not in r}
    return found.get("unbatched"), found.get("batched")


def _ratio(batched: dict | None, unbatched: dict | None, name: str) -> float | None:
    if batched is None or unbatched is None or not unbatched.get(name) or batched.get(name) is None:
        return None
    return round(batched[name] / unbatched[name], 3)


def ratios(rows: list[dict]) -> list[dict]:
    """Per device count: batched / unbatched cloud tokens per second and p99 latency (None where not measured)."""
    out = []
    for devices in sorted({r["devices"] for r in rows}):
        u, b = pair(rows, devices)
        out.append({"devices": devices, "tokens_per_s": _ratio(b, u, "cloud_tokens_per_s"),
                    "p99": _ratio(b, u, "latency_p99_ms")})
    return out


def served(rows: list[dict], mode: str, target_ms: float) -> tuple[int, bool]:
    """(the largest device count whose p99 stays under target_ms, with every smaller measured count also
    under it and without errors; 0 when even the smallest is not; whether that is the largest count measured)."""
    points = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["devices"])
    best = 0
    for r in points:
        if not _ok(r) or r["latency_p99_ms"] is None or r["latency_p99_ms"] >= target_ms:
            break
        best = r["devices"]
    return best, bool(points) and best == points[-1]["devices"]


def summary(header: dict, rows: list[dict]) -> dict:
    """What the report states besides the table: ratios, devices served per mode, problems."""
    target = header["config"]["latency_target_ms"]
    served_by = {}
    for mode in ("unbatched", "batched"):
        n, all_of_them = served(rows, mode, target)
        served_by[mode] = {"devices": n, "all_measured": all_of_them}
    notes = []
    if not header["max_batch_option"]:
        notes.append("this broker has no --max-batch option: both modes ran the broker's default serving, so "
                     "batched and unbatched are the same code (rerun on a broker with --max-batch)")
    if any(r.get("batches") is None and "failed" not in r for r in rows):
        notes.append("the broker exports no cecollm_broker_batch_size histogram: batch sizes n/a")
    failed = [r for r in rows if not _ok(r)]
    if failed:
        notes.append("points with problems: " + "; ".join(
            f"{r['mode']} x{r['devices']}: " + (r.get("failed") or f"{r['errors']} errors ({r['mismatches']} "
                                                 f"mismatches), {r['timeouts']} timeouts") for r in failed))
    return {"ratios": ratios(rows), "served": served_by, "target_ms": target,
            "errors": sum(r.get("errors", 0) for r in rows), "mismatches": sum(r.get("mismatches", 0) for r in rows),
            "timeouts": sum(r.get("timeouts", 0) for r in rows), "failed_points": len([r for r in rows if "failed" in r]),
            "notes": notes}


def table(rows: list[dict]) -> list[str]:
    """The per-point table (markdown)."""
    lines = []
    for r in sorted(rows, key=lambda r: (r["devices"], r["mode"] != "unbatched")):
        if "failed" in r:
            lines.append([str(r["devices"]), r["mode"], *["-"] * 11, f"failed: {r['failed']}"])
            continue
        batch = str(r["max_batch"]) + ("" if r["max_batch_applied"] else " (not applied)")
        lines.append([str(r["devices"]), r["mode"], batch, _f(r["cloud_tokens_per_s"], 2), _f(r["latency_p50_ms"]),
                      _f(r["latency_p99_ms"]), _f(r["batch_mean"], 2),
                      "n/a" if r["batch_max"] is None else str(r["batch_max"]), _histogram(r["batch_histogram"]),
                      _mib(r["cm_rss_peak"]), _mib(r["shm_peak"]), f"{r['errors']} / {r['timeouts']}",
                      str(r["mismatches"]), str(r["cloud_tokens"])])
    header = ["devices", "mode", "max batch", "cloud tokens/s", "p50 ms", "p99 ms", "batch mean", "batch max ≤",
              "batches by size (≤size:count)", "CM RSS peak MiB", "shm peak MiB", "errors / timeouts", "mismatches",
              "cloud tokens"]
    return _table(header, lines)


def _served_line(s: dict, trace: dict, pace: float) -> str:
    def one(mode: str) -> str:
        v = s["served"][mode]
        if not v["devices"]:
            return f"{mode}: none (p99 ≥ {s['target_ms']:g} ms already at the smallest count, or errors)"
        if v["all_measured"]:
            return f"{mode}: at least {v['devices']} devices (the largest count measured)"
        return f"{mode}: {v['devices']} devices"
    rate = trace.get("requests_per_s_per_device")
    if pace == 1:
        where = f"At the paper's request rate (the trace's: {_f(rate, 2)} cloud requests/s per device)"
    elif pace == 0:
        where = "With requests back to back (pace 0, not the paper's rate)"
    else:  # the edge's recorded time is stretched by `pace`: the rate is roughly the trace's / pace
        where = f"At pace {pace:g} (the trace's {_f(rate, 2)} cloud requests/s per device, edge time x {pace:g})"
    return (f"{where}, the largest device count whose p99 stays under {s['target_ms']:g} ms: {one('unbatched')}; "
            f"{one('batched')}.")


def render(header: dict, rows: list[dict], plot_path: Path | None, plot_note: str = "") -> str:
    """report.md."""
    c, t = header["config"], header["trace"]
    s = summary(header, rows)
    ratio_rows = [[str(r["devices"]), _f(r["tokens_per_s"], 2), _f(r["p99"], 2)] for r in s["ratios"]]
    plural = lambda n, word: f"{n} {word}{'s' if n > 1 else ''}"
    workers = f"{plural(c['workers'], 'worker')} at {plural(c['threads'], 'torch thread')} each"
    length = f"{c['duration']:g} s per point (round the trace)" if c["duration"] else "each generation once per device"
    lines = [
        "# Scaling: one broker, batched and unbatched", "",
        f"Model {c['model']}, the paper's mode (threshold {c['threshold']:g}, exact off). One edge's trace "
        f"({t['generations']} generations, {t['tokens']} tokens, {t['cloud_requests']} cloud requests over "
        f"{t['seconds']:g} s of recorded time: `{header['trace_path']}`) replayed from each device count against "
        f"the mode's broker (one per mode, up for the whole run) with {workers}; batched = `--max-batch "
        f"{c['max_batch'] or max(c['devices'])}`, unbatched = `--max-batch 1`. Pace {c['pace']:g} (1: the "
        f"recorded request rate), {length}, start stagger {c['stagger']:g} s. Latency: per cloud request, "
        "measured by the replaying device (send to reply). Tokens/s: cloud tokens over the point's wall time. "
        "Memory: the content manager's peak RSS and the device segments in /dev/shm. A mismatch is a reply that "
        "differs from the recorded token. The broker's own view of the latency (arrival to reply: "
        "broker_latency_mean_ms, broker_latency_p99_le_ms) is in raw.jsonl. Batch sizes: the broker's "
        "cecollm_broker_batch_size histogram over the point (every request it hands a worker, HELLOs included).",
        "",
        *table(rows), "",
        "Batched / unbatched:", "", *_table(["devices", "cloud tokens/s", "p99"], ratio_rows), "",
        _served_line(s, t, c["pace"]), "",
        f"Errors {s['errors']} (mismatches {s['mismatches']}), timeouts {s['timeouts']}, failed points "
        f"{s['failed_points']}.", "",
    ]
    loads = [r["load_1min"] for r in rows if r.get("load_1min") is not None]
    if loads:
        lines += [f"The machine's 1-minute load average at the points' starts: {min(loads):.1f} to {max(loads):.1f} "
                  f"({header.get('cpus', '?')} CPUs); other work on it shows as latency.", ""]
    lines += [f"- {n}" for n in s["notes"]] + ([""] if s["notes"] else [])
    if plot_path is not None:
        lines += [f"![scaling]({plot_path.name})", ""]
    elif plot_note:
        lines += [f"No plot: {plot_note}.", ""]
    lines += [f"Started {header['started']}; raw rows in `raw.jsonl`; the trace and the brokers' logs in `raw/`.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, target_ms: float) -> tuple[Path | None, str]:
    """Cloud tokens/s and p99 against device count, both modes; (path, "") or (None, why not)."""
    try:
        import matplotlib
    except ImportError:
        return None, "matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "failed" not in r]
    if not ok:
        return None, "no point ran"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("unbatched", "--s"), ("batched", "-o")):
        pts = sorted((r["devices"], r["cloud_tokens_per_s"], r["latency_p99_ms"]) for r in ok if r["mode"] == mode)
        if pts:
            left.plot([p[0] for p in pts], [p[1] for p in pts], style, label=mode)
            right.plot([p[0] for p in pts], [p[2] for p in pts], style, label=mode)
    right.axhline(target_ms, color="#aa3333", lw=0.8, ls=":", label=f"{target_ms:g} ms")
    counts = sorted({r["devices"] for r in ok})
    for ax, label in ((left, "cloud tokens per second"), (right, "request latency p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_xlabel("devices")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    right.set_yscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    right.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ... in plain numbers
    right.yaxis.set_major_formatter(ScalarFormatter())
    right.yaxis.set_minor_formatter(NullFormatter())
    p99s = [r["latency_p99_ms"] for r in ok if r["latency_p99_ms"]] + [target_ms]
    right.set_ylim(min(p99s) / 1.6, max(p99s) * 1.6)  # room for a labelled tick on both sides
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, ""


def write_report(out: Path, header: dict, rows: list[dict]) -> tuple[Path, str]:
    """report.md and scaling.png into `out`; (report path, its text)."""
    path, note = plot(rows, out / "scaling.png", header["config"]["latency_target_ms"])
    text = render(header, rows, path, note)
    report = out / "report.md"
    report.write_text(text)
    return report, text
