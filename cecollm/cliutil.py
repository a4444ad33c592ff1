"""What every entry point shares: one-line errors for user mistakes, logging, quiet libraries."""

from __future__ import annotations

import logging
import os
import sys

import click

from cecollm.errors import UserError


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
    """Log lines to stderr; quiet transformers' own warnings and progress bars."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
