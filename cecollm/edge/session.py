"""What one generation of an edge device keeps: its stats, its result, its record while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from cecollm.edge.partition import EdgePartition
from cecollm.generation import GenerationResult


@dataclass
class EdgeStats:
    prompt_tokens: int = 0
    edge_tokens: int = 0  # decided by a confident exit
    cloud_tokens: int = 0  # decided by the cloud
    fallback_tokens: int = 0  # decided at the last exit because the cloud did not (timeouts, errors, standalone)
    timeouts: int = 0  # requests the cloud did not answer in time
    reuploads: int = 0  # sessions reopened after the cloud lost the device's state
    rejoins: int = 0  # times the edge went on with the cloud again after going on alone
    bytes_up: int = 0  # request and upload bytes sent (shared-memory rows not included)
    shm_bytes: int = 0  # rows handed over through shared memory
    bytes_down: int = 0  # reply bytes received
    edge_seconds: float = 0.0  # edge compute
    cloud_seconds: float = 0.0  # cloud compute, as the workers report it
    comm_seconds: float = 0.0  # waiting on the cloud minus its compute
    standalone_reason: str = ""  # why the generation (or its rest) ran on the edge alone
    drafts: int = 0  # exact mode: tokens drafted (rolled-back ones included)
    rollbacks: int = 0  # exact mode: wrong drafts the cloud found, each a roll-back on both sides
    verifies: int = 0  # exact mode: verdicts received
    verify_seconds: float = 0.0  # exact mode: request to verdict, summed over the verdicts
    waiting_seconds: float = 0.0  # exact mode: the edge idle, waiting for a verdict
    wasted_seconds: float = 0.0  # exact mode: edge compute on drafts that were rolled back


@dataclass
class EdgeResult(GenerationResult):
    """A generation's tokens, with the edge's stats (to_dict as the in-process engine's)."""

    stats: EdgeStats = field(default_factory=EdgeStats)


@dataclass
class Generation:
    """One generation under way."""

    edge: EdgePartition
    stats: EdgeStats
    session: int | None = None  # the cloud session; None: the edge goes on alone
    kept: list = field(default_factory=list)  # (start, rows [n, hidden] wire dtype) uploaded, for a re-upload
    timeouts_in_row: int = 0
    rejoin_at: float | None = None  # going on alone: when to try the cloud again (None: never)
    rejoin_wait: float = 0.0  # the wait before the next try, doubled at each failure
    alone_since: float = 0.0  # when the edge went on alone
    epoch: int = 0  # exact mode: roll-backs of the session so far (uploads and requests name it)


class CloudGone(Exception):
    """The cloud cannot serve this generation any more (the reason is the message)."""
