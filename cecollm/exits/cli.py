"""Click commands of the exits package: train-exits, exits-selfgen, exits-report."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from cecollm.cliutil import GuardedCommand, set_threads
from cecollm.config import DEFAULT_MODEL
from cecollm.exits.config import HOLDOUT, DataConfig, TrainConfig
from cecollm.split import parse_exits

_T = TrainConfig()
_D = DataConfig()
# Option types: a number out of range is click's usage error (exit code 2), not a traceback later.
_COUNT = click.IntRange(min=0)  # 0 = none / all / no limit
_POSITIVE = click.IntRange(min=1)
_LENGTH = click.IntRange(min=2)  # a sequence needs an input and a next token
_NOT_NEGATIVE = click.FloatRange(min=0)
_ABOVE_ZERO = click.FloatRange(min=0, min_open=True)


def _arch_options(arch: str, rank: int | None, vocab: int) -> dict:
    options = {}
    if arch == "adapter":
        options = {"rank": 64 if rank is None else rank, "vocab": vocab}
    elif rank is not None or vocab:
        raise click.UsageError(f"--rank and --vocab apply to --arch adapter, not {arch}")
    return options


@click.command("train-exits", cls=GuardedCommand)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model directory, .gguf, or the default's name.")
@click.option("--exits", required=True, help="Exits as numbers of decoder layers run, e.g. 10,20.")
@click.option("--data", "data", multiple=True, required=True, metavar="FILE",
              help="Training text (repeat for several): jsonl with Alpaca, XSum, TruthfulQA, prompt/response "
                   "or text records, or plain text. The last --holdout records of Alpaca files are held out.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Heads file to write (.safetensors).")
@click.option("--arch", default=_T.arch, show_default=True, type=click.Choice(["norm", "adapter", "layer"]),
              help="norm: the final norm alone; adapter: low-rank adapter + norm (optionally a reduced "
                   "vocabulary); layer: one extra decoder layer (teacher-forced measurement only).")
@click.option("--rank", type=_COUNT, default=None, help="Adapter rank (adapter; 0 = norm only) [default: 64].")
@click.option("--vocab", type=_COUNT, default=0, show_default=True,
              help="Reduced vocabulary: the N tokens the full model picks most often plus an 'other' class "
                   "that defers (adapter; 0 = the full LM head). 8192 makes a SmolLM2 head 15x cheaper.")
@click.option("--eval-data", multiple=True, metavar="FILE", help="Extra evaluation-only files (all records).")
@click.option("--holdout", type=_COUNT, default=_D.holdout, show_default=True, help="Alpaca records held out at the end of each file.")
@click.option("--max-tokens", type=_COUNT, default=_D.max_tokens, show_default=True,
              help="Token budget of the teacher pass (0 = all text).")
@click.option("--max-len", type=_LENGTH, default=_D.max_len, show_default=True, help="Tokens per sequence at most.")
@click.option("--top-k", type=_POSITIVE, default=_D.top_k, show_default=True, help="Teacher probabilities cached per token.")
@click.option("--epochs", type=_ABOVE_ZERO, default=_T.epochs, show_default=True)
@click.option("--batch-rows", type=_POSITIVE, default=_T.batch_rows, show_default=True, help="Tokens per optimizer step.")
@click.option("--lr", type=_NOT_NEGATIVE, default=_T.lr, show_default=True, help="Peak learning rate (0 = per-architecture default).")
@click.option("--seed", type=int, default=_T.seed, show_default=True, help="Initialisation and data order (deterministic).")
@click.option("--greedy-weight", type=click.FloatRange(0, 1), default=_T.greedy_weight, show_default=True,
              help="Mix the KL target with the final layer's greedy token: 0 = match its distribution, 1 = "
                   "predict its greedy choice (confidence then estimates agreement with the full model).")
@click.option("--max-minutes", type=_NOT_NEGATIVE, default=_T.max_minutes, show_default=True,
              help="Stop training after this long and write the heads (0 = no limit); run again to resume.")
@click.option("--fresh", is_flag=True, help="Ignore a checkpoint (<out>.ckpt) instead of resuming from it.")
@click.option("--cache", default=_D.cache, help="Teacher cache directory [default: under $CECOLLM_HOME/exit-cache].")
@click.option("--cache-layers", default="", help="Extra layers to cache for later runs, e.g. 6,8,12.")
@click.option("--half", is_flag=True, help="Store the heads as float16.")
@click.option("--threads", type=_POSITIVE, default=1, show_default=True, help="Torch threads.")
def train_exits_command(model, exits, data, out, arch, rank, vocab, eval_data, holdout, max_tokens, max_len, top_k,
                        epochs, batch_rows, lr, seed, greedy_weight, max_minutes, fresh, cache, cache_layers, half,
                        threads):
    """Train early-exit heads on a frozen model by self-distillation.

    One frozen forward pass over the text caches the hidden states at the exits and the final
    layer's top-k next-token probabilities; the heads then learn to match them (KL, mixed with
    the final layer's greedy token by --greedy-weight). Runs are deterministic for a --seed,
    write a checkpoint (<out>.ckpt) as they go, and resume from it; --max-minutes stops early.
    The default heads of SmolLM2-135M-Instruct were made with --rank 64 --vocab 8192 (see
    cecollm/data/HEADS.md).
    """
    set_threads(threads)
    exit_list = parse_exits(exits)
    options = _arch_options(arch, rank, vocab)
    from cecollm.errors import UserError
    for path in list(data) + list(eval_data):
        if not Path(path).is_file():
            raise UserError(f"data file not found: {path}")
    from cecollm.exits.training_run import train_exits
    from cecollm.loading import load_model

    loaded = load_model(model)
    config = TrainConfig(arch=arch, arch_options=options, epochs=epochs, batch_rows=batch_rows, lr=lr, seed=seed,
                         greedy_weight=greedy_weight, max_minutes=max_minutes)
    dcfg = DataConfig(data=tuple(data), eval_data=tuple(eval_data), holdout=holdout, max_len=max_len, top_k=top_k,
                      max_tokens=max_tokens, cache=cache,
                      cache_layers=parse_exits(cache_layers) if cache_layers else ())
    command = " ".join(["cecollm"] + [shlex.quote(a) for a in sys.argv[1:]])
    heads = train_exits(loaded, exit_list, dcfg, config, Path(out), resume=not fresh, half=half, command=command)
    summary = heads.training["summary"]
    click.echo(f"wrote {out}: {arch} heads at exits {','.join(map(str, heads.exits))}; "
               f"{summary['steps']}/{summary['total_steps']} steps, loss {summary['first_loss']:.3f} -> "
               f"{summary['final_loss']:.3f} in {summary['seconds']:.0f} s")
    for name, result in heads.training["evaluation"].items():
        click.echo(f"{name} ({result['rows']} tokens, teacher-forced): " + json.dumps(result["exits"]))
        click.echo(f"  cascade: {json.dumps(result['cascade'])}")
    if not summary["complete"]:
        click.echo(f"stopped by the time budget; run the same command again to resume from {out}.ckpt", err=True)


@click.command("exits-selfgen", cls=GuardedCommand)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--data", "data", multiple=True, required=True, metavar="FILE", help="Files with prompts (repeat).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="jsonl of prompt/response records (appended).")
@click.option("--part", type=click.Choice(["train", "heldout"]), default="train", show_default=True,
              help="Training records, or the held-out Alpaca records (for evaluation).")
@click.option("--holdout", type=_COUNT, default=HOLDOUT, show_default=True)
@click.option("--n", "limit", type=_COUNT, default=0, show_default=True, help="Answer the first N prompts (0 = all).")
@click.option("--max-new-tokens", type=_POSITIVE, default=96, show_default=True)
@click.option("--batch-size", type=_POSITIVE, default=16, show_default=True)
@click.option("--threads", type=_POSITIVE, default=1, show_default=True)
def selfgen_command(model, data, out, part, holdout, limit, max_new_tokens, batch_size, threads):
    """Write the model's own greedy answers to prompts, as training text for train-exits.

    Prompts are taken round-robin from the files; running again skips prompts already answered.
    """
    set_threads(threads)
    from cecollm.exits.data import read_examples
    from cecollm.exits.selfgen import generate_answers
    from cecollm.loading import load_model

    examples = read_examples(list(data), part, holdout)
    if limit:
        examples = examples[:limit]
    loaded = load_model(model)
    n = generate_answers(loaded, examples, Path(out), max_new_tokens, batch_size)
    click.echo(f"{out}: {n} new answers")


@click.command("exits-report", cls=GuardedCommand)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--heads", default=None, help="Heads file [default: the model's default heads].")
@click.option("--prompts", required=True, help="Alpaca jsonl (its held-out records by default), jsonl with "
              "prompt/question/text fields, or a text file with one prompt a line.")
@click.option("--part", type=click.Choice(["heldout", "all"]), default="heldout", show_default=True,
              help="For Alpaca files: the held-out last --holdout records, or all.")
@click.option("--holdout", type=_COUNT, default=HOLDOUT, show_default=True)
@click.option("--n", "limit", type=_COUNT, default=0, show_default=True, help="Use the first N prompts (0 = all).")
@click.option("--max-new-tokens", type=_POSITIVE, default=64, show_default=True)
@click.option("--thresholds", default="0.5,0.6,0.7,0.8,0.9,1.0", show_default=True)
@click.option("--out", "out_dir", default="exits-report", show_default=True, type=click.Path(file_okay=False),
              help="Directory for exits-report.json, .md and .png.")
@click.option("--threads", type=_POSITIVE, default=1, show_default=True)
def exits_report_command(model, heads, prompts, part, holdout, limit, max_new_tokens, thresholds, out_dir, threads):
    """Share of tokens decided on the edge, agreement and ROUGE-L against threshold 1.0, compute per token."""
    from cecollm.errors import UserError

    try:
        ts = tuple(sorted({float(t) for t in thresholds.split(",") if t.strip()}))
    except ValueError:
        raise UserError(f"--thresholds takes numbers separated by commas, got {thresholds!r}") from None
    if not ts or any(not 0 <= t <= 1 for t in ts):
        raise UserError("thresholds must be in [0, 1]")
    set_threads(threads)
    from cecollm.edge.heads import edge_setup
    from cecollm.exits.report import format_table, read_prompts, run_report, write_outputs
    from cecollm.spec import ModelSpec

    chosen = read_prompts(prompts, part, holdout)
    if limit:
        chosen = chosen[:limit]
    if not chosen:
        raise UserError(f"{prompts}: no prompts ({part})")
    spec = ModelSpec.from_options(model, heads=heads)
    loaded = spec.load(transformers=True)  # the report calls the model (teacher-forced logits)
    split, head_set = edge_setup(spec, loaded)
    report = run_report(loaded, split, head_set, chosen, max_new_tokens, ts)
    click.echo(f"exits {','.join(map(str, split.exits))} of {split.n_layers}, {len(chosen)} prompts "
               f"({chosen[0][0]} ... {chosen[-1][0]}), max {max_new_tokens} new tokens")
    click.echo(format_table(report))
    write_outputs(report, Path(out_dir))
    click.echo(f"wrote {out_dir}/exits-report.json, .md, .png")


@click.command("exits-compare", cls=GuardedCommand)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--exits", required=True, help="Exits to train and measure, e.g. 10,20.")
@click.option("--train-cache", required=True, type=click.Path(file_okay=False), help="A cache dir of train-exits (train-*).")
@click.option("--eval-cache", required=True, multiple=True, type=click.Path(file_okay=False), help="Evaluation cache dirs (repeat).")
@click.option("--candidates", default="lens,norm,adapter:64,adapter:64:8192,layer", show_default=True,
              help="Heads to compare: lens (untrained), norm, adapter:RANK[:VOCAB], layer; a suffix @W "
                   "trains with greedy weight W (see train-exits --greedy-weight).")
@click.option("--epochs", type=_ABOVE_ZERO, default=1.0, show_default=True)
@click.option("--max-minutes", type=_NOT_NEGATIVE, default=0.0, show_default=True, help="Training budget per candidate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--splits", default="", help="Subsets of the exits to measure as cascades, e.g. '12,24;16,24'.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the rows as JSON and a markdown table (.md).")
def exits_compare_command(model, exits, train_cache, eval_cache, candidates, epochs, max_minutes, seed, splits, out):
    """Compare head architectures on the same cached text (teacher-forced) and their cost."""
    from cecollm.errors import UserError

    set_threads(1)
    from cecollm.exits.collect import load_cache
    from cecollm.exits.compare import compare, format_rows, merge_caches
    from cecollm.loading import load_model

    exit_list = parse_exits(exits)
    loaded = load_model(model)
    train = load_cache(Path(train_cache), exit_list)
    evals = merge_caches([load_cache(Path(p), exit_list) for p in eval_cache])
    base = TrainConfig(epochs=epochs, max_minutes=max_minutes, seed=seed)
    subsets = [parse_exits(part) for part in splits.split(";") if part.strip()]
    if any(e not in exit_list for sub in subsets for e in sub):
        raise UserError("--splits may only use exits given in --exits")
    rows = compare(loaded.model, exit_list, train, evals, [c for c in candidates.split(",") if c], base,
                   cascades=subsets)
    table = format_rows(rows)
    click.echo(table)
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
        Path(out).with_suffix(".md").write_text(table + "\n")
