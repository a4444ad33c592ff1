"""The report's explanations: which measured term makes each number what it is, and what would change it.

Every function reads the sums in results.json (one dataset's strategies, or the scaling rows) and
returns sentences; nothing here runs a model, so a report can be rewritten from results.json alone.
"""

from __future__ import annotations

from cecollm.bench.config import GOALS, SPEED_DATASETS

TARGETS = {key: target for key, _, _, target, _ in GOALS}
TIME_TARGET = TARGETS["total_vs_cloud"]  # total time vs cloud-based, at most
BYTES_TARGET = TARGETS["bytes_vs_naive"]  # bytes vs naive, at most
ROUGE_TARGET = TARGETS["rouge_vs_cloud"]  # ROUGE-L vs cloud-based, at least
# Table 4's removals against CE-CoLLM 0.8, and the naive baseline that removes them all at once
ABLATIONS = (("ce-0.8-fp32", "float16 transfer"), ("ce-1.0", "early exit"),
             ("ce-0.8-nocm", "the content manager and parallel upload"),
             ("naive", "all of them (naive cloud-edge: no exits, float32, stateless cloud)"))


def add_explanations(results: dict) -> None:
    """Fill each timing dataset's explanation fields and the scaling summary, in place."""
    meta = results["meta"]
    pinned = bool(meta.get("config", {}).get("pin"))
    for name, ds in results["datasets"].items():
        speed = name in SPEED_DATASETS
        ds["explanation"] = explain_time(ds, meta.get("split"), pinned) if speed else None
        ds["bytes_explanation"] = explain_bytes(ds) if speed else None
        ds["rouge_explanation"] = explain_rouge(ds) if speed else None
        ds["ablation_explanation"] = explain_ablations(ds, meta.get("link_up_mbit")) if speed else []
    if "scaling" in results:
        results["scaling"]["explanation"] = explain_scaling(results["scaling"])


def explain_time(dataset: dict, split: dict | None, pinned: bool = True) -> str | None:
    """Which term makes CE-CoLLM 0.8's total what it is, against cloud-based, and what would close a miss."""
    s = dataset["strategies"]
    ce, base = s.get("ce-0.8"), s.get("cloud")
    if not ce or not base or not base["total_s"]:
        return None
    t0 = base["total_s"]
    parts = {"edge compute": ce["edge_s"], "cloud compute": ce["cloud_s"], "communication": ce["comm_s"]}
    parts["other (edge client overhead)"] = max(0.0, ce["total_s"] - sum(parts.values()))
    worst = max(parts, key=parts.get)
    shares = ", ".join(f"{k} {v / t0:.2f}" for k, v in parts.items())
    rate = ce["cloud_request_rate"] or 0.0
    text = (f"CE-CoLLM 0.8 total = {ce['total_s'] / t0:.2f} of cloud-based ({shares}, as fractions of the "
            f"cloud-based total); the largest term is {worst}; {rate:.0%} of tokens still asked the cloud.")
    if split:
        words, edge_share, cloud_share = _weigh_split(split)
        text += " " + words
        if edge_share is not None:
            predicted = edge_share + cloud_share * rate
            text += (f" On equal cores the split predicts a total of about {edge_share:.2f} + {cloud_share:.2f} x "
                     f"{rate:.2f} = {predicted:.2f} of cloud-based before link time and exit heads.")
            extra = parts["edge compute"] / t0 - edge_share
            if extra > 0.05:
                text += (f" The edge measured {extra:.2f} more than its layers' share: the exit heads and the "
                         "edge's per-token overhead (and any load on its core).")
    if ce["total_s"] / t0 <= TIME_TARGET:
        return text
    return text + " " + _explain_request_budget(ce, t0, pinned)


def _explain_request_budget(ce: dict, t0: float, pinned: bool) -> str:
    """How many cloud requests the measured costs allow under the target, and what would close a miss."""
    fixed = ce["total_s"] - ce["cloud_s"] - ce["comm_s"]  # edge compute and client overhead
    closers = ("exits placed earlier in the model (a smaller edge partition: the paper's edge holds about half "
               "of a 7B model, with exits trained together with the backbone), or an edge faster per layer than "
               "the cloud" + (" (here both are one core of the same CPU)" if pinned else ""))
    if fixed / t0 >= TIME_TARGET:
        return (f"The edge's part alone (compute and overhead) is {fixed / t0:.2f} of cloud-based, already over "
                f"{TIME_TARGET}: no request rate closes it; {closers} would.")
    per = (ce["cloud_s"] + ce["comm_s"]) / max(1, ce["cloud_requests"])
    allowed = (TIME_TARGET * t0 - fixed) / per if per > 0 else float("inf")
    return (f"Measured: the edge's part (compute and overhead) is {fixed / t0:.2f} of cloud-based and each cloud "
            f"request costs {1e3 * per:.1f} ms (cloud compute and communication), so {TIME_TARGET} leaves room for "
            f"about {allowed:.0f} requests in {ce['tokens']} tokens ({allowed / max(1, ce['tokens']):.0%}; this run "
            f"made {ce['cloud_requests']}). What would close it: exit heads confident and right on more tokens, "
            f"{closers}.")


def _weigh_split(split: dict) -> tuple[str, float | None, float | None]:
    """(words, edge share, cloud-request share) of a whole-model token by weights, from the split alone."""
    n, u = split["n_layers"], split["upload_layer"]
    text = f"The edge runs {u} of {n} layers for every token (exits at {', '.join(map(str, split['exits']))})"
    layer, head = split.get("layer_params"), split.get("lm_head_params")
    if not layer or head is None:
        return text + ".", None, None
    whole = n * layer + head
    edge, cloud = u * layer / whole, ((n - u) * layer + head) / whole
    return (text + f"; by weights that is {edge:.2f} of a whole-model token, and a cloud request ({n - u} layers "
            f"plus the {head / 1e6:.0f}M-weight LM head) {cloud:.2f}.", edge, cloud)


def explain_bytes(dataset: dict) -> str | None:
    """Why the byte ratio to naive is what it is: naive grows with tokens x positions, CE-CoLLM with positions."""
    s = dataset["strategies"]
    ce, naive = s.get("ce-0.8"), s.get("naive")
    if not ce or not naive or not naive["wire_bytes"] or not naive["tokens"]:
        return None
    n = len(dataset["prompts"]) or 1
    t, p = naive["tokens"] / n, naive["prompt_tokens"] / n
    rows_naive = t * (p + (t - 1) / 2)  # every request carries all positions so far (float32)
    rows_ce = p + t  # each row once (float16: half the bytes)
    text = (f"Bytes vs naive = {ce['wire_bytes'] / naive['wire_bytes']:.4f}: naive sends all positions every "
            f"token ({t:.0f} tokens after {p:.0f}-token prompts: ~{rows_naive:.0f} float32 rows per generation), "
            f"CE-CoLLM each row once in float16 (~{rows_ce:.0f} rows), so the ratio is about "
            f"{rows_ce / (2 * rows_naive):.4f} before message overheads; it falls as answers get longer "
            f"(about 1/(2 x tokens) for long prompts).")
    if ce["wire_bytes"] / naive["wire_bytes"] <= BYTES_TARGET:
        return text
    need = next((k for k in range(1, 100_000) if (p + k) / (2 * k * (p + (k - 1) / 2)) <= BYTES_TARGET), None)
    if need is not None and need > t:
        text += (f" Under {BYTES_TARGET:.0%} needs answers of about {need} tokens or more after {p:.0f}-token "
                 f"prompts; these averaged {t:.0f}, so the miss is set by the answer length, not by how CE-CoLLM "
                 "sends (longer answers or longer prompts close it).")
    else:
        text += (f" The rows alone would be under {BYTES_TARGET:.0%}: the message overheads (headers, requests, "
                 "replies) make the miss; fewer, larger upload messages would close it.")
    return text


def explain_rouge(dataset: dict) -> str | None:
    """Why CE-CoLLM 0.8's output differs from cloud-based, when it does."""
    s = dataset["strategies"]
    ce = s.get("ce-0.8")
    if not ce or ce.get("rouge_vs_cloud") is None or ce["rouge_vs_cloud"] >= ROUGE_TARGET:
        return None
    higher = ", ".join(f"{k} {s[k]['rouge_vs_cloud']:.3f}" for k in ("ce-0.9", "ce-1.0") if k in s
                       and s[k].get("rouge_vs_cloud") is not None)
    return (f"ROUGE-L vs cloud-based = {ce['rouge_vs_cloud']:.3f}: exits decided "
            f"{ce['edge_tokens'] / max(1, ce['tokens']):.0%} of tokens, and under greedy decoding one exit token "
            f"that differs from the full model's sends the rest of the answer elsewhere "
            f"({ce['identical_to_cloud']:.0%} of outputs stayed identical). Exit heads that agree more with the "
            f"final layer at 0.8 confidence, or a higher threshold, close it ({higher or 'no higher threshold run'}).")


def explain_ablations(dataset: dict, up_mbit: float | None, margin: float = 0.02) -> list[str]:
    """One line per removal in Table 4 (and the naive baseline): how much slower, which terms moved, and why.

    A difference counts only beyond `margin`, or beyond the run-to-run noise where the run measured it: the
    float32 run does the same edge work as the float16 one, so their edge compute differs only by noise.
    """
    s = dataset["strategies"]
    ref = s.get("ce-0.8")
    if not ref or not ref["total_s"] or not ref["tokens"]:
        return []
    noise = _measure_noise(ref, s.get("ce-0.8-fp32"))
    limit = max(margin, noise or 0.0)
    within = f"within {limit:.1%}" + (", the noise measured on the same edge work" if limit > margin else "")
    context = {"up_mbit": up_mbit, "noise": noise,
               "prompt_tokens": ref["prompt_tokens"] / max(1, len(dataset["prompts"]))}
    lines = []
    for key, feature in ABLATIONS:
        a = s.get(key)
        if not a or not a["tokens"]:
            continue
        rel = a["total_s"] / ref["total_s"]
        per_token = (a["total_s"] / a["tokens"]) / (ref["total_s"] / ref["tokens"])
        if per_token > 1 + limit:
            verdict = "slower: the paper's direction"
        elif per_token < 1 - limit:
            verdict = "faster: not the paper's direction"
        else:
            verdict = f"no clear difference ({within})"
        moved = (f"edge {a['edge_s'] - ref['edge_s']:+.2f} s, cloud {a['cloud_s'] - ref['cloud_s']:+.2f} s, "
                 f"communication {a['comm_s'] - ref['comm_s']:+.2f} s, "
                 f"bytes x{_times(a['wire_bytes'], ref['wire_bytes'])}, "
                 f"cloud requests {ref['cloud_requests']} -> {a['cloud_requests']}")
        lines.append(f"Without {feature}: total {rel:.0%} of CE-CoLLM 0.8 ({per_token:.0%} per generated token), "
                     f"{verdict}; against CE-CoLLM 0.8: {moved}. {_EXPLAIN_REMOVAL[key](a, ref, context)}")
    return lines


def _measure_noise(ref: dict, fp32: dict | None) -> float | None:
    """Relative edge-compute difference between two runs that did the same edge work, if they did."""
    if not fp32 or fp32["tokens"] != ref["tokens"] or fp32["cloud_requests"] != ref["cloud_requests"]:
        return None
    return abs(fp32["edge_s"] - ref["edge_s"]) / ref["edge_s"] if ref["edge_s"] else None


def _times(a: float, b: float) -> str:
    """a / b as a short factor, 'n/a' when b is 0."""
    return f"{a / b:.1f}" if b else "n/a"


def _explain_fp32(a: dict, ref: dict, context: dict) -> str:
    """Float16's saving is bounded by the time its bytes take on the link."""
    extra = a["wire_bytes"] - ref["wire_bytes"]
    text = f"Float16 halves the hidden states on the wire ({extra / 1e6:.2f} MB fewer here)"
    if context["up_mbit"]:
        bound = extra * 8 / (context["up_mbit"] * 1e6)
        text += (f"; at {context['up_mbit']:g} Mbit/s those bytes take at most {bound:.2f} s "
                 f"({bound / ref['total_s']:.1%} of the total) even if none of the upload overlapped the edge's "
                 "compute, and it runs in parallel with it")
    text += "."
    if context["noise"] is not None:
        text += (f" Both runs did the same edge work (same tokens, same exits), yet the edge's compute differs by "
                 f"{a['edge_s'] - ref['edge_s']:+.2f} s ({context['noise']:.1%}): that is this machine's run-to-run "
                 "noise, and a difference in total beyond the byte time is noise too.")
    return text + (" Float16 matters where the upload is a large share of the time: a slower link (the wan preset) "
                   "or wider hidden states (the paper's 7B model sends rows 4096 wide).")


def _explain_no_exit(a: dict, ref: dict, context: dict) -> str:
    """Without exits every token is a cloud request; what each request costs."""
    more = a["cloud_requests"] - ref["cloud_requests"]
    if more <= 0:
        return "The exits decided no tokens at 0.8, so there was nothing to remove."
    per = (a["cloud_s"] - ref["cloud_s"] + a["comm_s"] - ref["comm_s"]) / more
    return (f"Every token now asks the cloud: {more} more requests ({ref['edge_tokens']} tokens the exits decided "
            f"at 0.8, {a['tokens'] - ref['tokens']:+d} from answers of another length), each costing about "
            f"{1e3 * per:.1f} ms of cloud compute and communication, while the edge runs the same layers either way. "
            "The outputs differ, so the verdict goes by the time per generated token.")


def _explain_no_cm(a: dict, ref: dict, context: dict) -> str:
    """Without the content manager every request carries all rows and the cloud recomputes them."""
    return (f"Without the content manager each request carries every row so far, synchronously "
            f"(x{_times(a['wire_bytes'], ref['wire_bytes'])} bytes, "
            f"communication x{_times(a['comm_s'], ref['comm_s'])}), "
            f"and the stateless cloud recomputes its layers over every position each time (cloud compute "
            f"x{_times(a['cloud_s'], ref['cloud_s'])}); both grow with the prompt ({context['prompt_tokens']:.0f} "
            "tokens on average here), so longer prompts suffer more.")


def _explain_naive(a: dict, ref: dict, context: dict) -> str:
    """Naive cloud-edge removes everything at once."""
    base = f" ({a['total_vs_cloud']:.2f} of cloud-based)" if a.get("total_vs_cloud") is not None else ""
    return (f"Naive cloud-edge{base} pays for every removal at once: all tokens go to the cloud with every row so "
            f"far in float32 (x{_times(a['wire_bytes'], ref['wire_bytes'])} bytes), and the cloud recomputes them "
            f"(cloud compute x{_times(a['cloud_s'], ref['cloud_s'])}).")


_EXPLAIN_REMOVAL = {"ce-0.8-fp32": _explain_fp32, "ce-1.0": _explain_no_exit, "ce-0.8-nocm": _explain_no_cm,
                    "naive": _explain_naive}


def explain_scaling(scaling: dict) -> list[str]:
    """Per dataset: CE-CoLLM 0.8 against cloud-based at the most devices both ran, and how each grew."""
    rows = [r for r in scaling.get("rows", [])
            if not r.get("error") and not r.get("errors") and r.get("wall_seconds")]
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        walls = {(r["kind"], r["devices"]): r for r in rows if r["dataset"] == dataset}
        both = sorted(k for kind, k in walls if kind == "ce-0.8" and ("cloud", k) in walls)
        if not both:
            continue
        lo, hi = both[0], both[-1]
        ce_lo, ce_hi, cb_lo, cb_hi = (walls[(kind, k)] for kind, k in
                                      (("ce-0.8", lo), ("ce-0.8", hi), ("cloud", lo), ("cloud", hi)))
        line = (f"{dataset}: at {hi} devices CE-CoLLM 0.8 finished in {ce_hi['wall_seconds']:.1f} s and cloud-based "
                f"in {cb_hi['wall_seconds']:.1f} s ({ce_hi['wall_seconds'] / cb_hi['wall_seconds']:.2f})")
        if lo == hi:
            lines.append(line + ".")
            continue
        line += (f"; at {lo}: {ce_lo['wall_seconds'] / cb_lo['wall_seconds']:.2f}. From {lo} to {hi} devices "
                 f"cloud-based grew x{cb_hi['wall_seconds'] / cb_lo['wall_seconds']:.2f}: its one cloud core runs "
                 f"the whole model for every device. CE-CoLLM grew x{ce_hi['wall_seconds'] / ce_lo['wall_seconds']:.2f}"
                 ": each device's edge does most of the work on its own hardware and the cloud only the requests")
        p99 = (ce_lo.get("latency_p99_ms"), ce_hi.get("latency_p99_ms"))
        lines.append(line + (f", whose p99 latency went from {p99[0]:.0f} to {p99[1]:.0f} ms." if None not in p99
                             else "."))
    return lines
