"""Shared-memory segments holding one device session's state, and their layout.

One segment per session: a header (what the content manager says of the session: the current lease,
the rows received, the epoch; then the edge's draft after each row), then, page-aligned, the cloud
layers' KV cache [cloud_layers, 2, n_kv, capacity, head_dim] (model dtype), then, page-aligned, the
upload-layer rows [capacity, hidden] (wire dtype) indexed by position. Only the content manager writes
the header; a worker that keeps a device's lease reads it to serve the device's next request without
asking (see cloud/service.py). The content manager creates and
unlinks segments; workers and same-host edges attach by name and never unlink. Python 3.11's
SharedMemory registers even a mere attachment with the resource tracker (shared by every
process the broker spawned), which then unlinks or complains about segments it does not own;
attaching goes around it (a plain mmap of the /dev/shm file, Linux only).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE
SHM_DIR = Path("/dev/shm")
HEADER_WORDS = 8  # uint64 words at offset 0: the Header fields, then room to grow
LEASE, RECEIVED, EPOCH = 0, 1, 2  # the header's words: the current lease's token (0: none), rows received, epoch


@dataclass(frozen=True)
class StateLayout:
    """Byte layout of a session segment (both sides compute it from the same numbers)."""

    cloud_layers: int  # decoder layers the cloud runs
    n_kv_heads: int
    head_dim: int
    hidden: int
    capacity: int  # positions
    kv_itemsize: int  # bytes per KV element (the model's dtype)
    wire_itemsize: int  # bytes per row element (the wire dtype)

    @property
    def drafts_offset(self) -> int:
        return HEADER_WORDS * 8

    @property
    def kv_offset(self) -> int:
        return -(-(self.drafts_offset + 4 * self.capacity) // PAGE) * PAGE

    @property
    def kv_shape(self) -> tuple[int, ...]:
        return (self.cloud_layers, 2, self.n_kv_heads, self.capacity, self.head_dim)

    @property
    def kv_bytes(self) -> int:
        return self.cloud_layers * 2 * self.n_kv_heads * self.capacity * self.head_dim * self.kv_itemsize

    @property
    def row_bytes(self) -> int:
        return self.hidden * self.wire_itemsize

    @property
    def rows_offset(self) -> int:
        return self.kv_offset + -(-self.kv_bytes // PAGE) * PAGE

    @property
    def nbytes(self) -> int:
        return self.rows_offset + self.capacity * self.row_bytes

    def rows_span(self, start: int, stop: int) -> tuple[int, int]:
        """Byte range [begin, end) of rows [start, stop)."""
        return self.rows_offset + start * self.row_bytes, self.rows_offset + stop * self.row_bytes

    def dropped_pages(self, folded: int) -> tuple[int, int]:
        """Whole pages holding only rows before `folded`: (offset, length), length may be 0."""
        begin = self.rows_offset
        end = (self.rows_span(0, folded)[1] // PAGE) * PAGE
        return begin, max(0, end - begin)


def header(buf):
    """The segment's header words, a uint64 view [HEADER_WORDS] of `buf` (LEASE, RECEIVED, EPOCH index it)."""
    return np.ndarray((HEADER_WORDS,), dtype=np.uint64, buffer=buf)


def drafts(buf, layout: StateLayout):
    """The edge's draft after each row, a uint32 view [capacity] of `buf` (edge_cloud.NO_DRAFT: none)."""
    return np.ndarray((layout.capacity,), dtype=np.uint32, buffer=buf, offset=layout.drafts_offset)


def segment_prefix(owner_pid: int) -> str:
    """Names of one broker's segments start with this (cleanup finds leftovers by it)."""
    return f"cecollm-{owner_pid}-"


def create(name: str, nbytes: int) -> SharedMemory:
    """A new segment, owned by the caller alone: it is not left to the resource tracker, which would warn
    about (and unlink) every segment of a content manager that was killed; unlink() removes it, and
    remove_leftovers() what a killed owner left."""
    seg = SharedMemory(name=name, create=True, size=nbytes)
    resource_tracker.unregister(seg._name, "shared_memory")  # noqa: SLF001 (the name it registered)
    return seg


def unlink(seg: SharedMemory) -> None:
    """Remove a segment made by create() (SharedMemory.unlink would unregister it a second time)."""
    try:
        os.unlink(SHM_DIR / seg.name)
    except FileNotFoundError:
        pass


class Attachment:
    """A segment someone else owns, mapped into this process (never unlinked from here)."""

    def __init__(self, name: str) -> None:
        if "/" in name or not name:
            raise ValueError(f"bad segment name {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.name = name
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        """Unmap; raises BufferError while tensors or arrays still view `buf`."""
        self.buf.release()
        self._mmap.close()


def attach(name: str) -> Attachment:
    return Attachment(name)


def drop_pages(seg: SharedMemory, offset: int, length: int) -> None:
    """Give the pages of [offset, offset+length) back to the system (they read as zeros after)."""
    if length > 0 and hasattr(mmap, "MADV_REMOVE"):
        seg._mmap.madvise(mmap.MADV_REMOVE, offset, length)  # noqa: SLF001 (no public handle)


def remove_leftovers(prefix: str) -> list[str]:
    """Unlink segments named `prefix*` that a crashed process left in /dev/shm."""
    removed = []
    if SHM_DIR.is_dir():
        for path in SHM_DIR.glob(prefix + "*"):
            try:
                os.unlink(path)
                removed.append(path.name)
            except FileNotFoundError:
                pass
    return removed
