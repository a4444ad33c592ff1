"""`cecollm-broker`: the cloud daemon's command line (options default to BrokerConfig's fields)."""

from __future__ import annotations

import sys

import click

from cecollm.broker.daemon import BrokerConfig
from cecollm.cliutil import GuardedCommand, dtype_option

_B = BrokerConfig()


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--requests", "request_address", default=_B.request_address, show_default=True,
              help="Where edges send requests (ROUTER); several endpoints separated by commas.")
@click.option("--uploads", "upload_address", default=_B.upload_address, show_default=True,
              help="Where edges push hidden states (PULL); several endpoints separated by commas.")
@click.option("--workers-address", "worker_address", default=_B.worker_address, show_default=True,
              help="Where workers connect (ROUTER); give it to `cecollm-worker --broker`. tcp://*:PORT lets "
              "workers on other hosts connect.")
@click.option("--state-address", default=_B.state_address, help="The content manager's control socket "
              "[default: ipc:// in the temp directory]; tcp://*:PORT for remote workers (cecollm-worker --remote).")
@click.option("--model", default=_B.model, show_default=True, help="A transformers directory, a .gguf file, "
              "or the default model's name.")
@click.option("--exits", default=_B.exits, help="Exits, e.g. 8,15 [default: the model's default split]; "
              "edges must use the same.")
@click.option("--upload-layer", type=int, default=_B.upload_layer, help="Layer whose output edges upload "
              "[default: the last exit].")
@click.option("--heads", default=_B.heads, help="Heads file whose exits define the split.")
@dtype_option(_B.dtype)
@click.option("--workers", type=int, default=_B.workers, show_default=True, help="Worker processes to start.")
@click.option("--heartbeat-ms", type=int, default=_B.heartbeat_ms, show_default=True,
              help="Heartbeat interval between the broker and its workers.")
@click.option("--liveness", type=int, default=_B.liveness, show_default=True,
              help="Heartbeats a worker may miss before it is purged.")
@click.option("--capacity", type=int, default=_B.capacity, show_default=True, help="Positions per device.")
@click.option("--budget-mb", type=int, default=_B.budget_mb, show_default=True,
              help="Shared memory for all devices' state; idle devices are evicted (LRU) past it.")
@click.option("--idle-ttl", type=float, default=_B.idle_ttl, show_default=True,
              help="Seconds before an idle device's state is released.")
@click.option("--wait-seconds", type=float, default=_B.wait_seconds, show_default=True,
              help="How long a request waits for hidden states still in flight (parked: it holds no worker).")
@click.option("--job-seconds", type=float, default=_B.job_seconds, show_default=True,
              help="A worker that holds one request longer is dropped (its request goes to another; a worker "
              "this broker started is killed and replaced).")
@click.option("--claim-seconds", type=float, default=_B.claim_seconds, show_default=True,
              help="A device id whose session was used within this long belongs to its edge: another edge with "
              "the same id is refused (unless it takes over: cecollm-edge --take-over).")
@click.option("--max-per-device", type=int, default=_B.max_per_device, show_default=True,
              help="Requests one device may have in the cloud at once (queued, waiting for rows, computing).")
@click.option("--max-batch", type=int, default=_B.max_batch, show_default=True,
              help="Requests of different devices a worker computes in one pass (their rows share each layer's "
              "matrix products and the LM head's weights are read once). 1 computes one request at a time.")
@click.option("--max-queue", type=click.IntRange(min=1), default=_B.max_queue, show_default=True,
              help="Requests waiting for a worker before new ones are refused (busy).")
@click.option("--retries", type=click.IntRange(min=0), default=_B.retries, show_default=True,
              help="Times a request whose worker died is handed to another.")
@click.option("--threads", type=int, default=_B.threads, show_default=True, help="Torch threads per worker.")
@click.option("--keys", default=_B.keys, help="The keys directory from `cecollm keys` (the broker's key pair, the "
              "accepted device and worker keys) [default: $CECOLLM_HOME/keys]. SIGHUP reloads its key lists.")
@click.option("--insecure", is_flag=True, default=_B.insecure, help="No keys, no encryption: anyone who reaches a "
              "port can act as any device, so every socket binds loopback only. For local experiments.")
@click.option("--metrics", metavar="HOST:PORT", default=_B.metrics, help="Serve Prometheus metrics over HTTP here "
              "(GET /metrics) [default: none]. \":PORT\" binds loopback; other hosts must be named (no authentication).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def broker_command(**options) -> None:
    """Serve the cloud partition: a broker, a content manager holding every device's state in
    shared memory, and --workers worker processes. Ctrl-C (or SIGTERM) stops everything."""
    from cecollm.broker.daemon import serve_broker
    from cecollm.runtime import run_daemon

    config = BrokerConfig(**options)
    sys.exit(run_daemon("broker", serve_broker, config, config.verbose))


def main() -> None:
    broker_command(prog_name="cecollm-broker")
