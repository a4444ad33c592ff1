"""What a cloud worker does with one edge request, on state the content manager holds.

HELLO: check the edge runs the same model and split, open a session. DECIDE: lease the
device, attach its shared-memory segment, resume a CloudPartition over the KV cache and
rows there (the KV is written in place), commit the folded positions (one way), answer the token.
A lease that must wait (NOT_YET: rows still in flight, or another worker holds the device) makes
the request go back to the broker, which parks it: no worker waits.
Segments stay mapped between requests (no map, unmap and page faults per token); sweep()
unmaps those the content manager has released, so their memory goes back.

A remote service (a worker on another host than the content manager) never touches shared memory: its
lease asks for the state as tensors (the filled KV and the rows not yet folded), it folds them in a KV
cache of its own for this one request, and commits the KV entries it appended (a call the content
manager answers), so the state still lives in the content manager only.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict

import numpy as np
import torch

from cecollm.cache import shm
from cecollm.cache.kv import KVCache
from cecollm.cloud.partition import CloudPartition
from cecollm.dtypes import from_numpy, to_numpy
from cecollm.layers import DecoderRunner
from cecollm.split import Split
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.dispatch import Dispatcher
from cecollm.wire.rpc import CallTimeout, RpcSocket
from cecollm.wire.wire import DTYPE_CODES, DTYPES, ErrorCode, ProtocolError, clip

log = logging.getLogger(__name__)

MAPPED_SEGMENTS = 16  # device segments a worker keeps mapped at most (least recently used unmapped first)


class Refused(Exception):
    """The request cannot be served; carries the error code for the edge."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CloudService:
    """Serves edge requests for one model and split; holds no device state itself."""

    def __init__(self, runner: DecoderRunner, split: Split, identity: str, state: RpcSocket,
                 state_timeout: float = 10.0, remote: bool = False) -> None:
        self.runner = runner
        self.remote = remote  # state as tensors over the socket, never a shared-memory segment
        self.split = split
        self.identity = identity
        self.state = state
        self.state_timeout = state_timeout
        self.layout_base = dict(cloud_layers=split.n_layers - split.upload_layer, n_kv_heads=runner.n_kv_heads,
                                head_dim=runner.head_dim, hidden=runner.hidden_size,
                                kv_itemsize=runner.embed.weight.element_size())
        self.segments: OrderedDict[str, shm.Attachment] = OrderedDict()  # mapped, least recently used first
        self.requests = Dispatcher({ep.Hello: self.hello, ep.Decide: self.decide, ep.Verify: self.verify})

    def close(self) -> None:
        for name in list(self.segments):
            self._unmap(name)
        self.state.close()

    def sweep(self) -> None:
        """Unmap segments whose device state was released (their file is gone from /dev/shm)."""
        for name in list(self.segments):
            if not os.path.exists(shm.SHM_DIR / name):
                self._unmap(name)

    def _segment(self, name: str) -> shm.Attachment:
        try:
            seg = self.segments.pop(name, None) or shm.attach(name)
        except FileNotFoundError:
            raise Refused(ErrorCode.INTERNAL, f"the device's segment {name} is not in {shm.SHM_DIR} here: a worker on "
                          "another host than the broker's must run with --remote") from None
        self.segments[name] = seg
        while len(self.segments) > MAPPED_SEGMENTS:
            self._unmap(next(iter(self.segments)))
        return seg

    def _unmap(self, name: str) -> None:
        try:
            self.segments[name].close()
        except BufferError:  # a traceback still holds tensors over it: unmapped when collected
            pass
        del self.segments[name]

    def handle(self, frames) -> list | None:
        """Frames of the reply to the edge request `frames`, or None when its lease must wait (the
        broker parks it); never raises for bad input."""
        seq = 0
        try:
            msg = ep.parse(frames, self.requests.commands)
            seq = msg.seq
            return self.requests(msg).to_frames()
        except ProtocolError as exc:
            log.warning("edge request refused: %s", exc)
            return ep.Error(seq, ErrorCode.MALFORMED, clip(str(exc))).to_frames()
        except Refused as exc:
            if exc.code == ErrorCode.NOT_YET:
                return None
            return ep.Error(seq, exc.code, clip(str(exc))).to_frames()
        except Exception as exc:  # a bug must not take the worker down; the edge hears of it
            log.exception("request failed")
            return ep.Error(seq, ErrorCode.INTERNAL, clip(f"{type(exc).__name__}: {exc}")).to_frames()

    def _call(self, msg, retry_later: bool = False):
        """The content manager's answer to `msg`. A call it does not answer in time (the socket then starts
        afresh, so a late answer cannot pass for the next call's) fails the request; with `retry_later`
        (OPEN and LEASE: nothing computed yet) the broker keeps the request and sends it out again, so a
        restarted content manager serves it (a lease then hears that the session is gone)."""
        try:
            self.state.send(msg.to_frames())
            reply = sp.parse(self.state.receive(time.monotonic() + self.state_timeout), sp.REPLIES)
        except CallTimeout:
            raise Refused(ErrorCode.NOT_YET if retry_later else ErrorCode.INTERNAL,
                          "the content manager did not answer") from None
        if isinstance(reply, sp.Error):
            raise Refused(reply.code, reply.message)
        return reply

    def hello(self, msg: ep.Hello) -> ep.Welcome:
        dtype = str(self.runner.embed.weight.dtype).removeprefix("torch.")  # the compute dtype
        if msg.dtype != dtype:
            raise Refused(ErrorCode.MISMATCH, f"dtype mismatch: the edge computes in {msg.dtype}, the cloud in {dtype}")
        if msg.identity != self.identity or msg.n_layers != self.split.n_layers:
            raise Refused(ErrorCode.MISMATCH, f"model mismatch: the edge runs {msg.identity[:12]} "
                          f"({msg.n_layers} layers), the cloud serves {self.identity[:12]} ({self.split.n_layers} layers)")
        if tuple(msg.exits) != self.split.exits or msg.upload_layer != self.split.upload_layer:
            edge = f"exits {','.join(map(str, msg.exits))}, upload after {msg.upload_layer}"
            raise Refused(ErrorCode.MISMATCH, f"split mismatch: the edge has {edge}, the cloud serves "
                          f"exits {','.join(map(str, self.split.exits))}, upload after {self.split.upload_layer}")
        opened = self._call(sp.Open(msg.device_id, DTYPE_CODES[msg.wire_dtype], msg.instance, msg.take_over),
                            retry_later=True)
        return ep.Welcome(msg.device_id, msg.seq, opened.session, opened.capacity, opened.rows_offset, opened.segment)

    def decide(self, msg: ep.Decide) -> ep.Token:
        return self._serve(msg, verify=False)

    def verify(self, msg: ep.Verify) -> ep.Token:
        return self._serve(msg, verify=True)

    def _serve(self, msg: ep.Decide | ep.Verify, verify: bool) -> ep.Token:
        """Lease the device, fold its rows up to the position (checking their drafts when `verify`),
        end the lease (a roll-back at a wrong draft), and answer the row and the token after it."""
        epoch = msg.epoch if verify else 0
        grant = self._call(sp.Lease(msg.device_id, msg.session, msg.seq, msg.position, self.remote, verify, epoch),
                           retry_later=True)
        if isinstance(grant, sp.Decided):  # a retry: the first worker committed this, then died
            return ep.Token(grant.position, grant.token, grant.prob, msg.device_id, msg.seq, 0.0)
        if isinstance(grant, sp.StateGrant) != self.remote:
            raise Refused(ErrorCode.INTERNAL, f"the content manager answered a {'remote' if self.remote else 'local'} "
                          f"lease with {type(grant).__name__}")
        drafts = {grant.folded + i: d for i, d in enumerate(grant.drafts) if d != ep.NO_DRAFT}

        def work(part: CloudPartition) -> tuple[int, int, float]:
            if verify:
                return part.verify(msg.position, drafts)
            return (msg.position, *part.decide(msg.position))

        if self.remote:
            row, token, prob, seconds, kv = self._fold_remote(grant, msg.position, work)
        else:
            row, token, prob, seconds = self._compute(grant, msg.position, work)  # seconds: the layers alone
        rollback = drafts.get(row, token) != token
        if self.remote:
            self._commit_remote(msg, grant, row, token, prob, kv, rollback)
        elif rollback:  # a call: the session is cut back before the edge hears of it
            self._call(sp.Rollback(msg.device_id, grant.token, row + 1, token, prob))
        else:
            # one way: if the request went to another worker meanwhile, it computes the same answer
            try:
                self.state.send(sp.Commit(msg.device_id, grant.token, row + 1, token, prob).to_frames())
            except CallTimeout:  # the lease lapses on its own; the answer is right all the same
                log.warning("device %d: the content manager took no commit", msg.device_id)
        return ep.Token(row, token, prob, msg.device_id, msg.seq, seconds)

    def _commit_remote(self, msg, grant: sp.StateGrant, row: int, token: int, prob: float, kv: np.ndarray,
                       rollback: bool) -> None:
        """A remote worker commits the KV entries it appended, [folded, row + 1), a call."""
        entries = np.ascontiguousarray(kv[:, :, :row + 1 - grant.folded])  # [L*2, kv, kept, hd]
        commit = sp.StateCommit(msg.device_id, grant.token, grant.folded, row + 1, token, prob, entries, rollback)
        try:
            self._call(commit)  # COMMITTED, or an error: the state is then as before
        except Refused as exc:
            if rollback:  # the session was not cut back: the edge must not go on from the wrong draft
                raise
            log.warning("device %d: remote commit refused: %s (the answer is right all the same)", msg.device_id, exc)

    @torch.inference_mode()
    def _fold_remote(self, grant: sp.StateGrant, position: int, work) -> tuple[int, int, float, float, np.ndarray]:
        """Fold the granted rows up to `position` on a copy of the granted KV; the new KV entries."""
        dtype = self.runner.embed.weight.dtype
        base = self.layout_base
        layers, n_kv, hd = base["cloud_layers"], base["n_kv_heads"], base["head_dim"]
        folded, n = grant.folded, position + 1 - grant.folded
        assert 0 < n <= grant.rows.shape[0], f"granted rows [{folded}, {grant.received}) miss position {position}"
        if (grant.kv.dtype.name, grant.kv.shape) != (str(dtype).removeprefix("torch."), (layers * 2, n_kv, folded, hd)) \
                or grant.rows.shape[1] != base["hidden"]:
            raise Refused(ErrorCode.INTERNAL, f"granted KV {grant.kv.dtype.name} {grant.kv.shape} / rows "
                          f"{grant.rows.shape} do not fit this model")
        storage = torch.empty(layers, 2, n_kv, position + 1, hd, dtype=dtype)  # [L, 2, kv, position+1, hd]
        to_numpy(storage)[:, :, :, :folded] = grant.kv.reshape(layers, 2, n_kv, folded, hd)  # [L, 2, kv, folded, hd]
        rows = from_numpy(grant.rows[:n].copy())  # [n, hidden]; the frame itself is read-only
        cache = KVCache(self.split.upload_layer, layers, n_kv, hd, storage=storage)
        part = CloudPartition.resume(self.runner, self.split, cache, folded)
        part.receive(folded, rows.view(1, n, base["hidden"]))  # [1, n, hidden]
        t0 = time.perf_counter()
        row, token, prob = work(part)
        seconds = time.perf_counter() - t0
        new = storage[:, :, :, folded:].contiguous().view(layers * 2, n_kv, n, hd)  # [L*2, kv, n, hd]
        return row, token, prob, seconds, to_numpy(new)

    @torch.inference_mode()
    def _compute(self, grant: sp.Grant, position: int, work) -> tuple[int, int, float, float]:
        wire = DTYPES.get(grant.wire_code)
        assert wire is not None, f"the content manager granted an unknown wire code {grant.wire_code}"
        layout = shm.StateLayout(capacity=grant.capacity, wire_itemsize=wire.itemsize, **self.layout_base)
        seg = self._segment(grant.segment)
        return self._fold(seg, layout, getattr(torch, wire.name), grant.folded, position, work)

    def _fold(self, seg, layout: shm.StateLayout, wire_dtype, folded: int, position: int,
              work) -> tuple[int, int, float, float]:
        count = 1
        for n in layout.kv_shape:
            count *= n
        dtype = self.runner.embed.weight.dtype
        kv = torch.frombuffer(seg.buf, dtype=dtype, count=count).view(layout.kv_shape)  # [L, 2, kv, cap, hd]
        cache = KVCache(self.split.upload_layer, layout.cloud_layers, layout.n_kv_heads, layout.head_dim, storage=kv)
        n = position + 1 - folded
        begin, _ = layout.rows_span(folded, position + 1)
        rows = torch.frombuffer(seg.buf, dtype=wire_dtype, count=n * layout.hidden, offset=begin)
        part = CloudPartition.resume(self.runner, self.split, cache, folded)
        part.receive(folded, rows.view(1, n, layout.hidden))  # [1, n, hidden]
        t0 = time.perf_counter()
        row, token, prob = work(part)
        return row, token, prob, time.perf_counter() - t0
