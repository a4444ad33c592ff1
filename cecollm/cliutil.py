"""What every command line shares: one-line errors for user mistakes, logging, the model options."""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys

import click

from cecollm.errors import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _UserErrorExit(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _Guard:
    """Mixin: a UserError anywhere below becomes `error: ...` on one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise _UserErrorExit(str(exc)) from None


class GuardedGroup(_Guard, click.Group):
    pass


class GuardedCommand(_Guard, click.Command):
    pass


def setup_logging(verbose: bool = False) -> None:
    """Log lines to stderr; transformers' and the hub's own warnings and progress bars stay quiet."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported: tell it directly
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def set_threads(threads: int | None) -> None:
    """Torch's thread count; None leaves torch's choice. Below 1 is a UserError (torch raised a RuntimeError)."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def model_options(command):
    """Click options --model, --exits, --upload-layer, --heads, --dtype (defaults: ModelSpec's); the command
    gets them as one `spec` (a ModelSpec) argument."""
    from cecollm.spec import ModelSpec

    default = ModelSpec()

    @functools.wraps(command)
    def with_spec(*args, model, exits, upload_layer, heads, dtype, **kwargs):
        return command(*args, spec=ModelSpec.from_options(model, exits, upload_layer, heads, dtype), **kwargs)

    options = [
        click.option("--model", default=default.model, show_default=True,
                     help="A transformers directory, a .gguf file, or the default model's name."),
        click.option("--exits", default="", help="Exits as numbers of decoder layers run, e.g. 8,15 "
                     "[default: the model's default split]; edge and cloud must use the same."),
        click.option("--upload-layer", type=click.IntRange(min=0), default=default.upload_layer,
                     help="Layer whose output the cloud receives [default: the last exit]."),
        click.option("--heads", default=default.heads, help="Exit heads file (from `cecollm train-exits`) "
                     "[default: the model's trained heads, if it has any]."),
        dtype_option(default.dtype),
    ]
    for option in reversed(options):
        with_spec = option(with_spec)
    return with_spec


def dtype_option(default: str, help: str = ""):
    """The --dtype option (a compute dtype; `default` from a config dataclass, see dtypes.default_dtype)."""
    from cecollm.dtypes import COMPUTE_DTYPES

    return click.option("--dtype", type=click.Choice(COMPUTE_DTYPES), default=default, show_default=True,
                        help=help or "Compute dtype of the model; edge and cloud must use the same. The default is bfloat16 "
                        "where the CPU computes it natively (AVX512-BF16, AMX-BF16), else float32 ($CECOLLM_DTYPE "
                        "sets it). Uploads are the model's dtype when 2 bytes wide, float16 for float32.")


def tcp_address(address: str, option: str, example: str) -> tuple:
    """getaddrinfo's first (family, type, proto, canonname, sockaddr) for the `option` value HOST:PORT (":PORT"
    or "PORT": loopback; "[::1]:PORT" for IPv6); a one-line UserError when it is malformed or names an
    unknown host. `example`: a good value, for the message."""
    host, sep, port = address.strip().rpartition(":")
    if not sep:
        host, port = "", address.strip()
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{option} {address!r}: give HOST:PORT with a port in 0..65535, e.g. {example}")
    try:
        return socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"{option} {address!r}: unknown host {host!r} ({exc})") from None
