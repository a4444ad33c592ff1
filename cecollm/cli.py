"""The `cecollm` command."""

from __future__ import annotations

import sys

import click
import orjson

from cecollm.cliutil import GuardedGroup, set_threads, setup_logging
from cecollm.config import DEFAULT_MODEL, MODES, GenerationConfig
from cecollm.split import parse_exits

_DEFAULTS = GenerationConfig()


class TextStream:
    """Prints generated text to stdout as tokens are decided (whole characters only)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def add(self, record) -> None:
        self.ids.append(record.token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        sys.stdout.write(text[self.printed:] + "\n")
        sys.stdout.flush()


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """cecollm: one LLM split between an edge device (with early exits) and a cloud server."""
    setup_logging(verbose)


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="A transformers directory, a .gguf file, or the default model's name.")
@click.option("--prompt", required=True, help="The user's prompt.")
@click.option("--mode", type=click.Choice(MODES), default=_DEFAULTS.mode, show_default=True,
              help="cloud: the whole model; standalone: the edge alone; collab: exits, then the cloud.")
@click.option("--threshold", type=float, default=_DEFAULTS.threshold, show_default=True,
              help="An exit decides when its top-1 probability reaches this; 1.0 disables early exit.")
@click.option("--exits", default=None, help="Exits as numbers of decoder layers run, e.g. 8,15 "
              "[default: the model's default split].")
@click.option("--upload-layer", type=int, default=None,
              help="Layer whose output the cloud receives [default: the last exit].")
@click.option("--heads", default=None, help="Exit heads file (from `cecollm train-exits`).")
@click.option("--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens, show_default=True)
@click.option("--raw", is_flag=True, help="Use the prompt as is, without the chat template.")
@click.option("--no-fp16", is_flag=True, help="Upload float32 hidden states instead of float16.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads [default: torch's choice].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text and stats.")
def generate(model, prompt, mode, threshold, exits, upload_layer, heads, max_new_tokens, raw, no_fp16,
             threads, as_json):
    """Generate greedily in one process and print the text and where each token was decided."""
    config = GenerationConfig(mode=mode, threshold=threshold, max_new_tokens=max_new_tokens, fp16=not no_fp16)
    exit_list = parse_exits(exits) if exits else None
    set_threads(threads)
    from cecollm.defaults import choose_split
    from cecollm.engine import SplitEngine
    from cecollm.loading import load_model
    from cecollm.prompting import encode_prompt

    loaded = load_model(model)
    prompt_ids = encode_prompt(loaded.tokenizer, prompt, raw)
    split, head_set = choose_split(loaded, exit_list, upload_layer, heads)
    engine = SplitEngine(loaded.model, split, head_set)
    stream = None if as_json else TextStream(loaded.tokenizer)
    result = engine.generate(prompt_ids, config, on_token=stream and stream.add)
    text = loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(result.to_dict(text)) + b"\n")
        return
    s = result.stats
    stream.finish()
    click.echo(
        f"[{mode} | {split.describe()} | threshold {threshold}] {len(result.token_ids)} tokens: "
        f"{s.edge_tokens} edge, {s.cloud_tokens} cloud; edge {s.edge_seconds:.2f} s, cloud {s.cloud_seconds:.2f} s; "
        f"{s.upload_bytes} bytes to the cloud",
        err=True,
    )


from cecollm.linkem.cli import linkem  # noqa: E402
cli.add_command(linkem)


from cecollm.exits.cli import (  # noqa: E402
    exits_compare_command, exits_report_command, selfgen_command, train_exits_command,
)

cli.add_command(train_exits_command)
cli.add_command(selfgen_command)
cli.add_command(exits_report_command)
cli.add_command(exits_compare_command)

from cecollm.bench.cli import bench_command  # noqa: E402
cli.add_command(bench_command)


def main() -> None:
    cli(prog_name="cecollm")
