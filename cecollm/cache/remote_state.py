"""A remote worker's copy of a device's state, for the content manager.

A worker on another host cannot map a device's segment: its grant carries the filled KV cache and the
rows not yet folded, copied out of the segment (StateGrant), and its commit carries the KV entries it
appended (StateCommit), which are checked against the device before the one copy into the segment.
"""

from __future__ import annotations

import numpy as np

from cecollm.cache.device import DeviceState
from cecollm.dtypes import numpy_dtype
from cecollm.wire import worker_state as sp
from cecollm.wire.wire import DTYPES, ErrorCode


def kv_view(dev: DeviceState, kv_dtype: str) -> np.ndarray:
    """The segment's KV cache [cloud_layers, 2, n_kv, capacity, head_dim] (a view: drop it before release)."""
    return np.ndarray(dev.layout.kv_shape, dtype=numpy_dtype(kv_dtype), buffer=dev.segment.buf,
                      offset=dev.layout.kv_offset)


def state_grant(dev: DeviceState, kv_dtype: str, drafts: tuple[int, ...]) -> sp.StateGrant:
    """A remote worker's grant: the filled KV and the rows not yet folded, copied out of the segment."""
    lay = dev.layout
    kv = np.ascontiguousarray(kv_view(dev, kv_dtype)[:, :, :, :dev.folded])  # [L, 2, kv, folded, hd]
    begin, _ = lay.rows_span(dev.folded, dev.received)
    rows = np.ndarray((dev.received - dev.folded, lay.hidden), dtype=DTYPES[dev.wire_code], buffer=dev.segment.buf,
                      offset=begin).copy()  # [received - folded, hidden]
    kv = kv.reshape(lay.cloud_layers * 2, lay.n_kv_heads, dev.folded, lay.head_dim)  # [L*2, kv, folded, hd]
    return sp.StateGrant(dev.lease_token, dev.folded, dev.received, lay.capacity, kv, rows, drafts)


def write_commit(dev: DeviceState, kv_dtype: str, msg: sp.StateCommit) -> tuple[ErrorCode, str] | None:
    """Check a remote worker's KV entries against `dev` (whose current lease `msg` holds) and write them into
    the segment; why they were refused, or None. Ending the lease is the caller's."""
    lay, n = dev.layout, msg.folded - msg.start
    expected = (lay.cloud_layers * 2, lay.n_kv_heads, n, lay.head_dim)
    if msg.start != dev.folded or msg.folded > dev.received:
        return ErrorCode.MALFORMED, (f"device {msg.device_id}: KV for positions [{msg.start}, {msg.folded}), "
                                     f"the device has {dev.folded} folded and {dev.received} received")
    if msg.kv.dtype.name != kv_dtype or msg.kv.shape != expected:
        return ErrorCode.MALFORMED, (f"device {msg.device_id}: KV {msg.kv.dtype.name} {msg.kv.shape}, expected "
                                     f"{kv_dtype} {expected}")
    entries = msg.kv.reshape(lay.cloud_layers, 2, lay.n_kv_heads, n, lay.head_dim)  # [L, 2, kv, n, hd]
    kv_view(dev, kv_dtype)[:, :, :, msg.start:msg.folded] = entries  # the one copy, from the frame into the segment
    return None
