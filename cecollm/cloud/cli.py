"""`cecollm-worker`: one more cloud worker for a running broker, started by hand."""

from __future__ import annotations

import sys

import click

from cecollm.cliutil import GuardedCommand
from cecollm.cloud.worker import WorkerConfig
from cecollm.dtypes import COMPUTE_DTYPES
from cecollm.errors import UserError

_W = WorkerConfig()


def _one_endpoint(address: str, remote: bool) -> None:
    if address and (len([e for e in address.split(",") if e.strip()]) != 1
                    or not address.startswith(("tcp://",) if remote else ("tcp://", "ipc://"))):
        raise UserError(f"address {address!r}: one {'tcp://' if remote else 'tcp:// or ipc://'} endpoint"
                        + (" (--remote)" if remote else ""))


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker", "broker_address", default=_W.broker_address, show_default=True,
              help="The broker's workers address (its --workers-address).")
@click.option("--remote", is_flag=True, default=_W.remote, help="Another host than the broker's: never map its "
              "shared memory, get each device's state as tensors from the content manager (the broker needs "
              "--state-address tcp://*:PORT).")
@click.option("--state", "state_address", default=_W.state_address, help="The content manager's address, e.g. "
              "tcp://HOST:PORT [default: as the broker names it; with --remote, on the --broker host].")
@click.option("--model", "model_dir", default=_W.model_dir, help="The model's transformers directory on this host "
              "[default: the broker's path].")
@click.option("--keys", "keys", default="", help="This worker host's key bundle from `cecollm keys DIR --worker NAME` "
              "(DIR/bundles/worker-NAME) [default: $CECOLLM_HOME/keys/bundles/worker-local].")
@click.option("--insecure", is_flag=True, help="No keys: for a broker started with --insecure (loopback only).")
@click.option("--threads", type=click.IntRange(min=1), default=_W.threads, show_default=True, help="Torch threads.")
@click.option("--dtype", type=click.Choice(COMPUTE_DTYPES), default=_W.dtype or None, help="The compute dtype this "
              "worker expects; a broker serving another is refused [default: the broker's --dtype].")
@click.option("-v", "--verbose", is_flag=True, default=_W.verbose, help="Debug logging.")
def worker_command(broker_address: str, remote: bool, state_address: str, model_dir: str, keys: str, insecure: bool,
                   threads: int, dtype: str | None, verbose: bool) -> None:
    """Start one more cloud worker for a running broker: on its host (device state in shared memory), or with
    --remote on another host (device state sent over TCP per request)."""
    from cecollm.cloud.worker import serve_worker
    from cecollm.runtime import run_daemon

    for address in (broker_address, state_address):
        _one_endpoint(address, remote)
    client_keys = None
    if not insecure:
        from cecollm.wire.security import ClientKeys, bundle

        client_keys = ClientKeys.load(keys or bundle("worker-local"))
    config = WorkerConfig(broker_address, threads, verbose=verbose, remote=remote, state_address=state_address,
                          model_dir=model_dir, client_keys=client_keys, dtype=dtype or "")
    sys.exit(run_daemon("worker", serve_worker, config, verbose))


def main() -> None:
    worker_command(prog_name="cecollm-worker")
