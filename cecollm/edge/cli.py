"""`cecollm-edge`: an edge device that generates with the cloud broker's help."""

from __future__ import annotations

import sys

import click
import orjson

from cecollm.cliutil import GuardedCommand, model_options, set_threads, setup_logging
from cecollm.edge.client import EdgeConfig
from cecollm.errors import UserError
from cecollm.prompting import read_prompts

_E = EdgeConfig()
DEFAULT_QUEUE = 16  # server.DEFAULT_QUEUE, without importing FastAPI for --help


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device-id", type=click.IntRange(0, 2**32 - 1), default=_E.device_id, show_default=True,
              help="This device's id (0 to 2^32-1); the cloud keeps one state per device.")
@click.option("--broker", default=_E.broker, show_default=True, help="The broker's request address "
              "(tcp://HOST:PORT, or ipc://...requests on the broker's host).")
@click.option("--upload", default=_E.upload, help="The upload address [default: the broker's port + 1, "
              "or ipc://...uploads].")
@click.option("--shm/--no-shm", default=None, help="Hand hidden states over through shared memory "
              "(same host only) [default: on for ipc:// addresses].")
@model_options
@click.option("--threshold", type=float, default=_E.threshold, show_default=True,
              help="An exit decides when its top-1 probability reaches this; 1.0 disables early exit.")
@click.option("--standalone", is_flag=True, help="Never ask the cloud: the last exit decides.")
@click.option("--exact/--paper", default=None, help="--exact [the default; --standalone: --paper]: every token is a "
              "draft the cloud verifies while the edge goes on, a wrong one is rolled back, and the output is the full "
              "model's at any threshold (bit for bit with --no-fp16). --paper: the paper's mode, a confident exit's "
              "token is final and the cloud decides the rest (not the full model's output).")
@click.option("--wait-below", type=click.FloatRange(0, 1), default=_E.wait_below, show_default=True,
              help="With --exact: below this draft confidence the edge waits for the cloud's token instead.")
@click.option("--no-fp16", is_flag=True, help="Upload float32 hidden states instead of 2 bytes a value (the model's bfloat16 or "
              "float16; float16 for a float32 model).")
@click.option("--max-new-tokens", type=int, default=_E.max_new_tokens, show_default=True,
              help="Stop after this many tokens; with --serve, for requests that name no max_tokens.")
@click.option("--timeout", type=float, default=_E.timeout, show_default=True,
              help="Seconds a single-token request may take before the edge decides the token itself.")
@click.option("--keys", default=_E.keys, help="This device's key bundle from `cecollm keys --device ID` "
              "[default: $CECOLLM_HOME/keys/bundles/device-ID].")
@click.option("--insecure", is_flag=True, default=_E.insecure, help="No keys, no encryption: for a broker started "
              "with --insecure (loopback only).")
@click.option("--take-over", is_flag=True, default=_E.take_over, help="Take the device id over from another edge "
              "still generating with it (it loses its cloud state); without it such an edge is an error.")
@click.option("--prompt", default=None, help="One prompt.")
@click.option("--prompts", "prompts_file", default=None, help="A JSONL file of prompts (fields \"prompt\", "
              "\"instruction\" + \"input\", \"document\", \"question\" or \"text\"), or a text file, one a line.")
@click.option("--raw", is_flag=True, help="Use prompts as they are, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per generation instead of text and stats.")
@click.option("--serve", metavar="HOST:PORT", default=None, help="Serve an OpenAI-compatible HTTP API here "
              "instead of generating from prompts (POST /v1/chat/completions, /v1/completions; GET /v1/models, "
              "/health, /metrics). \":PORT\" binds loopback; other hosts must be named (the API has no "
              "authentication).")
@click.option("--queue", type=click.IntRange(min=0), default=DEFAULT_QUEUE, show_default=True,
              help="With --serve: requests that may wait while one generates; past it they get 429 + Retry-After.")
@click.option("--served-model-name", default=None, help="With --serve: the model id requests name "
              "[default: the --model value].")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Torch threads.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (and, with --serve, an access log).")
def edge_command(spec, device_id, broker, upload, shm, threshold, standalone, exact, wait_below, no_fp16,
                 max_new_tokens, timeout, keys, insecure, take_over, prompt, prompts_file, raw, as_json, serve, queue,
                 served_model_name, threads, verbose) -> None:
    """Generate on this edge device; tokens no exit is sure of are asked of the cloud broker.

    Tokens stream to stdout as they are decided; each generation's stats go to stderr. With
    --serve HOST:PORT the device answers OpenAI API requests instead, one generation at a time."""
    setup_logging(verbose)
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    if max_new_tokens < 1 or timeout <= 0:
        raise UserError("--max-new-tokens and --timeout must be positive")
    if exact and standalone:
        raise UserError("--exact needs the cloud to verify; it cannot be --standalone")
    exact = _E.exact and not standalone if exact is None else exact
    config = EdgeConfig(device_id, broker, upload, shm, threshold, standalone, exact, wait_below, not no_fp16,
                        max_new_tokens, timeout, keys=keys, insecure=insecure, take_over=take_over)
    if not standalone:
        config.client_keys()  # a missing or damaged bundle is an error now, not after the model loads
    try:
        _ = config.upload_address  # derived from --broker: a broker address it cannot be derived from is an error now
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if serve is not None:
        if prompt is not None or prompts_file or raw or as_json:
            raise UserError("--serve answers HTTP requests: --prompt, --prompts, --raw and --json are for "
                            "generating from the command line")
        from cecollm.edge.server import ServeOptions, listen_socket

        sock = listen_socket(serve)  # a bad address is an error now, not after the model loads
        set_threads(threads)
        _serve(spec, config, sock, ServeOptions(served_model_name or spec.model, queue, max_new_tokens), verbose)
        return
    texts = read_prompts(prompt, prompts_file)
    set_threads(threads)
    from cecollm.edge.client import EdgeClient
    from cecollm.edge.heads import edge_setup
    from cecollm.prompting import TextStream, encode_prompt

    loaded = spec.load()
    split, head_set = edge_setup(spec, loaded)
    tok = loaded.tokenizer
    with EdgeClient(loaded.model, loaded.identity, split, head_set, config) as client:
        for text in texts:
            ids = encode_prompt(tok, text, raw)
            stream = None if as_json else TextStream(tok)
            result = client.generate(ids, stream and stream.add)
            if as_json:
                out = result.to_dict(tok.decode(result.token_ids, skip_special_tokens=True))
                out["device_id"] = device_id
                sys.stdout.buffer.write(orjson.dumps(out) + b"\n")
                sys.stdout.flush()
                continue
            stream.finish()
            mode = f"exact, threshold {threshold}" if exact else f"threshold {threshold}"
            click.echo(f"[device {device_id} | {split.describe()} | {mode}] {stats_line(result)}", err=True)


def _serve(spec, config: EdgeConfig, sock, options, verbose: bool) -> None:
    """Load the model, check the cloud serves the same model and split, and serve until stopped."""
    from cecollm.edge.client import EdgeClient
    from cecollm.edge.heads import edge_setup
    from cecollm.edge.server import EdgeServer, is_loopback, serve

    loaded = spec.load()
    if loaded.tokenizer is None:
        raise UserError("this model directory has no tokenizer: the server needs one")
    split, head_set = edge_setup(spec, loaded)
    with EdgeClient(loaded.model, loaded.identity, split, head_set, config) as client:
        server = EdgeServer(client, loaded.tokenizer, options)
        try:
            if not config.standalone:  # on the device's thread, as every later use of the client's sockets
                server.device.executor.submit(server.device.probe).result()
                if server.device.cloud_problem:
                    click.echo(f"warning: {server.device.cloud_problem}; serving anyway (generations go on on the "
                               "edge alone while the cloud does not answer)", err=True)
            host, port = sock.getsockname()[:2]
            where = f"[{host}]" if ":" in host else host
            mode = "standalone" if config.standalone else f"exact, threshold {config.threshold}" if config.exact \
                else f"threshold {config.threshold}"
            click.echo(f"serving device {config.device_id} ({options.model_name} | {split.describe()} | {mode}) "
                       f"at http://{where}:{port}/v1, queue {options.queue}"
                       + ("" if is_loopback(sock) else "; not loopback: the API has no authentication"), err=True)
        except BaseException:
            server.close()
            raise
        serve(server, sock, verbose)


def stats_line(result) -> str:
    """One generation's stats, for stderr."""
    s = result.stats
    return (f"{len(result.token_ids)} tokens: {s.edge_tokens} edge, {s.cloud_tokens} cloud, "
            f"{s.fallback_tokens} at the last exit ({s.timeouts} timeouts); {s.bytes_up} bytes up "
            f"(+{s.shm_bytes} via shared memory), {s.bytes_down} down; edge {s.edge_seconds:.2f} s, "
            f"cloud {s.cloud_seconds:.2f} s, communication {s.comm_seconds:.2f} s"
            + (f"; {s.drafts} drafts, {s.rollbacks} roll-backs, {s.wasted_seconds:.2f} s wasted, "
               f"{s.waiting_seconds:.2f} s waiting, verification {1000 * s.verify_seconds / s.verifies:.1f} ms"
               if s.verifies else "")
            + (f"; edge alone: {s.standalone_reason}" if s.standalone_reason else "")
            + (f"; rejoined the cloud {s.rejoins} times" if s.rejoins else ""))


def main() -> None:
    edge_command(prog_name="cecollm-edge")
