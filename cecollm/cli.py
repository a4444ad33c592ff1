"""The `cecollm` command."""

from __future__ import annotations

import sys

import click
import orjson

from cecollm.cliutil import GuardedGroup, model_options, set_threads, setup_logging
from cecollm.config import MODES, GenerationConfig
from cecollm.errors import UserError

_DEFAULTS = GenerationConfig()

# Commands defined in other packages, imported only when run or listed: `cecollm generate` starts
# without importing asyncio (linkem), the exit-head tools or the bench.
_LAZY_COMMANDS = {
    "linkem": ("cecollm.linkem.cli", "linkem"),
    "train-exits": ("cecollm.exits.cli", "train_exits_command"),
    "exits-selfgen": ("cecollm.exits.cli", "selfgen_command"),
    "exits-report": ("cecollm.exits.cli", "exits_report_command"),
    "exits-compare": ("cecollm.exits.cli", "exits_compare_command"),
    "bench": ("cecollm.bench.cli", "bench_command"),
}


class LazyGroup(GuardedGroup):
    """A group whose _LAZY_COMMANDS are imported on first use."""

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx, name):
        if name in _LAZY_COMMANDS and name not in self.commands:
            import importlib

            module, attr = _LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """cecollm: one LLM split between an edge device (with early exits) and a cloud server."""
    setup_logging(verbose)


@cli.command()
@model_options
@click.option("--prompt", required=True, help="The user's prompt.")
@click.option("--mode", type=click.Choice(MODES), default=_DEFAULTS.mode, show_default=True,
              help="exact: every token an edge draft the cloud verifies (the full model's output at any threshold); "
              "collab: the paper's mode (a confident exit's token is final, the cloud decides the rest); cloud: the "
              "whole model; standalone: the edge alone.")
@click.option("--threshold", type=float, default=_DEFAULTS.threshold, show_default=True,
              help="An exit decides when its top-1 probability reaches this; 1.0 disables early exit.")
@click.option("--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens, show_default=True)
@click.option("--raw", is_flag=True, help="Use the prompt as is, without the chat template.")
@click.option("--no-fp16", is_flag=True, help="Upload float32 hidden states instead of 2 bytes a value (the model's bfloat16 or "
              "float16; float16 for a float32 model).")
@click.option("--wait-below", type=click.FloatRange(0, 1), default=_DEFAULTS.wait_below, show_default=True,
              help="--mode exact: below this draft confidence wait for the cloud's token instead.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads [default: torch's choice].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text and stats.")
def generate(spec, prompt, mode, threshold, max_new_tokens, raw, no_fp16, wait_below, threads, as_json):
    """Generate greedily in one process and print the text and where each token was decided."""
    config = GenerationConfig(mode=mode, threshold=threshold, max_new_tokens=max_new_tokens, fp16=not no_fp16,
                              wait_below=wait_below)
    set_threads(threads)
    from cecollm.edge.heads import edge_setup
    from cecollm.engine import SplitEngine
    from cecollm.prompting import TextStream, encode_prompt

    loaded = spec.load()
    prompt_ids = encode_prompt(loaded.tokenizer, prompt, raw)
    split, head_set = edge_setup(spec, loaded)
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
        f"{s.bytes_up} bytes to the cloud" + (f"; {s.drafts} drafts, {s.rollbacks} roll-backs" if mode == "exact" else ""),
        err=True,
    )


@cli.command("keys")
@click.argument("directory", required=False)
@click.option("--device", "devices", multiple=True, metavar="NAME[=IDS]",
              help="A key bundle for a device: NAME is its bundle's name and, without =IDS, its device id; IDS "
              "are the device ids it may act for (3, 4-7, a comma list, or * for any). Repeat for more.")
@click.option("--worker", "workers", multiple=True, metavar="NAME", help="A key bundle for a worker host. Repeat.")
def keys_command(directory, devices, workers):
    """Make the cloud's keys (once) and key bundles for devices and worker hosts.

    DIRECTORY [default: $CECOLLM_HOME/keys] gets the broker's key pair, devices.txt and workers.txt (the
    accepted public keys; edit them and send the broker SIGHUP to reload), and bundles/<kind>-<NAME>/
    to copy to each client (cecollm-edge --keys, cecollm-worker --keys). Secret keys never leave it."""
    from cecollm.wire.security import default_dir, make_keys

    directory = directory or str(default_dir())
    pairs = []
    for text in devices:
        name, _, ids = text.partition("=")
        if not name or "/" in name:
            raise UserError(f"--device {text!r}: a name, then optionally =IDS")
        pairs.append((name, ids or name))
    for name in workers:
        if not name or "/" in name:
            raise UserError(f"--worker {name!r}: a name")
    made = make_keys(directory, pairs, list(workers))
    click.echo(f"keys in {directory} (the broker: cecollm-broker --keys {directory})")
    for bundle in made:
        click.echo(f"  {bundle}")


def main() -> None:
    cli(prog_name="cecollm")
