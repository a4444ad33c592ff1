"""`cecollm bench`: deployment strategies side by side on the same prompts and link (the paper's tables)."""

from __future__ import annotations

import click

from cecollm.bench.config import DATASETS, STRATEGIES, BenchConfig
from cecollm.cliutil import GuardedCommand
from cecollm.errors import UserError

_B = BenchConfig()


def _names(text: str, what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"--{what} is empty")
    return names


def _data_files(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not path:
            raise UserError(f"--data takes NAME=PATH, like xsum=my.jsonl; got {v!r}")
        out.append((name, path))
    return tuple(out)


def _scaling(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise UserError(f"--scaling takes device counts like 1,2,3,4,5 (or none); got {text!r}") from None


@click.command("bench", cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=_B.model, show_default=True,
              help="A transformers directory, a .gguf file, or the default model's name.")
@click.option("--heads", default=_B.heads, help="Exit heads file [default: the model's default heads].")
@click.option("--exits", default=_B.exits, help="Exits, e.g. 8,15 [default: the model's default split].")
@click.option("--n", "n", type=int, default=_B.n, show_default=True, help="Prompts per dataset (the first that fit).")
@click.option("--max-new-tokens", type=int, default=_B.max_new_tokens, show_default=True)
@click.option("--link", default=_B.link, show_default=True, help="Link emulator preset (lan, wifi, wan) on every "
              "socket between edge and cloud.")
@click.option("--datasets", default=",".join(_B.datasets), show_default=True,
              help=f"Comma-separated subset of {', '.join(DATASETS)} (TruthfulQA: accuracy grid only).")
@click.option("--strategies", default=",".join(_B.strategies), show_default=True,
              help="Comma-separated subset: " + ", ".join(s.name for s in STRATEGIES) + ".")
@click.option("--out", default=_B.out, help="Results directory [default: results/bench-<link>]; a rerun "
              "into it skips what is finished.")
@click.option("--data-dir", default=_B.data_dir, show_default=True, help="Where alpaca.jsonl, xsum.jsonl and "
              "truthfulqa.jsonl are.")
@click.option("--data", "data_files", multiple=True, metavar="NAME=PATH", help="Use this file for one dataset.")
@click.option("--threads", type=int, default=_B.threads, show_default=True,
              help="Torch threads on the edge and in each cloud process.")
@click.option("--no-pin", is_flag=True, help="Do not pin the edge and the cloud to separate cores.")
@click.option("--timeout", type=float, default=_B.timeout, show_default=True,
              help="Seconds one cloud request may take; longer stops the run (finished results stay).")
@click.option("--scaling", default=",".join(map(str, _B.scaling)), show_default=True,
              help="Device counts for the scaling section, or 'none'.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--report-only", is_flag=True, help="Run nothing: rewrite report.md, the plots and the explanations "
              "in results.json from the --out directory's results.json (raw/ not needed).")
def bench_command(model, heads, exits, n, max_new_tokens, link, datasets, strategies, out, data_dir, data_files,
                  threads, no_pin, timeout, scaling, quiet, report_only):
    """Run deployment strategies on the same prompts through an emulated link and write
    results/<run>/: raw/*.jsonl (one line per finished generation; a rerun skips those), results.json,
    report.md (the paper's Tables 2, 3 and 4, ratios, the goal check) and PNG plots.

    Strategies: cloud-based (whole model in the cloud), naive cloud-edge (all hidden states of every
    position each token, float32, stateless cloud), CE-CoLLM standalone, CE-CoLLM at 0.8/0.9/1.0
    (float16 and float32) through the real broker, and the ablation without the content manager
    and parallel upload. The edge runs in this process on one core, the cloud processes on another.
    """
    if report_only:
        from cecollm.bench.report import rewrite_report

        ctx = click.get_current_context()
        allowed = ("out", "link", "quiet", "report_only")
        given = [f"--{name.replace('_', '-')}" for name in ctx.params if name not in allowed
                 and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UserError(f"--report-only runs nothing and takes only --out (or --link for the default "
                            f"directory); drop {', '.join(given)}")

        path = rewrite_report(BenchConfig(link=link, out=out).out_dir)
        click.echo(f"rewrote {path}/report.md from {path}/results.json")
        return
    from cecollm.bench.run import run_bench

    config = BenchConfig(model=model, heads=heads, exits=exits, n=n, max_new_tokens=max_new_tokens, link=link,
                         datasets=_names(datasets, "datasets"), strategies=_names(strategies, "strategies"),
                         out=out, data_dir=data_dir, data_files=_data_files(data_files), threads=threads,
                         pin=not no_pin, timeout=timeout, scaling=_scaling(scaling))
    path = run_bench(config, progress=not quiet)
    click.echo(f"wrote {path}/results.json, {path}/report.md")
