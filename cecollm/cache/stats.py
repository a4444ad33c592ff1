"""The content manager's counters, which the broker exports as metrics (`cecollm-broker --metrics`).

Plain integers, bumped once per message on the serving loop (never per row, no lock, no system
call), and sent to the broker as a SNAPSHOT when it asks STATS (wire/worker_state.py), twice a
second while it exports metrics. The field names are SNAPSHOT's.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from cecollm.wire import worker_state as sp


@dataclass
class ManagerCounts:
    """Counts since this content manager started (a new one starts from 0: the broker adds them up)."""

    evictions: int = 0  # sessions released to make room in the byte budget
    idle_releases: int = 0  # sessions released after the idle TTL
    uploads_taken: int = 0  # upload-socket messages taken (rows or END)
    uploads_refused: int = 0  # ...refused: unreadable, another device's key, a session not open, rows out of order
    uploads_stale: int = 0  # ...dropped: rows of an epoch the session rolled back from
    upload_network_bytes: int = 0  # row bytes taken from UPLOAD frames
    upload_shm_bytes: int = 0  # row bytes the edge wrote into segments (UPLOAD_SHM)
    refused_upload_frames: int = 0  # upload-socket messages that did not parse
    refused_state_frames: int = 0  # state-socket messages that did not parse (or had no envelope)

    def snapshot(self, devices: int, used_bytes: int) -> sp.Snapshot:
        return sp.Snapshot(pid=os.getpid(), devices=devices, used_bytes=used_bytes, **asdict(self))
