"""Exceptions the project raises on purpose.

`UserError` is a mistake in what a person asked for (a missing model, an exit out of range):
entry points print its message on one line and exit with code 2, never a traceback.
"""


class CecollmError(Exception):
    """Base of every error cecollm raises on purpose."""


class UserError(CecollmError):
    """Bad input from the person running a command: printed as one line, exit code 2."""


class CacheFull(CecollmError):
    """A KV cache with a fixed capacity was asked to hold more positions than it has room for."""
