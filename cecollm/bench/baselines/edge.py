"""The edge side of the baselines that talk to the stateless baseline cloud (cecollm.bench.baselines.server).

- CloudBasedEdge: sends the prompt ids, gets the response ids (the edge computes nothing).
- FullUploadEdge: runs the edge partition with its exact KV and keeps every upload-layer row;
  when no exit decides, it sends all rows so far with the request and waits (synchronous). At
  threshold 1.0 with float32 this is the naive cloud-edge deployment (every token asks the cloud
  with all positions); at 0.8 with float16 it is the ablation without the content manager and
  parallel upload.

Communication time is measured at the edge: request to reply, minus the compute the cloud
reports for it. Both return EdgeResult with EdgeStats, like EdgeClient.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import zmq

from cecollm.bench.baselines import protocol as bp
from cecollm.dtypes import name_of, numpy_dtype, to_numpy, torch_dtype, wire_dtype
from cecollm.edge.heads import HeadSet
from cecollm.edge.partition import EdgePartition
from cecollm.edge.session import EdgeResult, EdgeStats
from cecollm.errors import CecollmError
from cecollm.generation import TokenRecord
from cecollm.layers import DecoderRunner
from cecollm.prompting import eos_ids
from cecollm.split import Split
from cecollm.wire.rpc import CallTimeout, RpcSocket
from cecollm.wire.wire import ProtocolError


class BaselineCloudError(CecollmError):
    """The baseline cloud refused a request or did not answer in time."""


class _Caller:
    """Request/reply over one DEALER connection, with byte and time accounting into EdgeStats."""

    def __init__(self, context: zmq.Context, address: str, timeout: float, keys=None) -> None:
        self.rpc = RpcSocket(context, address, keys=keys)
        self.address = address
        self.timeout = timeout
        self._seq = 0

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) % (1 << 32)
        return self._seq

    def call(self, msg, stats: EdgeStats):
        """The reply to `msg`; comm time = request to reply minus the cloud's own compute."""
        rpc = self.rpc
        sent, got = rpc.bytes_sent, rpc.bytes_received
        t0 = time.perf_counter()
        rpc.send(msg.to_frames())
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    reply = bp.parse(rpc.receive(deadline), bp.REPLIES)
                except ProtocolError as exc:
                    raise BaselineCloudError(f"bad reply from the baseline cloud: {exc}") from None
                if reply.seq == msg.seq:
                    break
        except CallTimeout:
            raise BaselineCloudError(f"the baseline cloud at {self.address} did not answer within "
                                     f"{self.timeout:g} s") from None
        finally:
            stats.comm_seconds += time.perf_counter() - t0
            stats.bytes_up += rpc.bytes_sent - sent
            stats.bytes_down += rpc.bytes_received - got
        if isinstance(reply, bp.Error):
            raise BaselineCloudError(f"the baseline cloud refused request {msg.seq}: "
                                     f"{reply.code.name}: {reply.message}")
        stats.cloud_seconds += reply.cloud_seconds
        stats.comm_seconds -= reply.cloud_seconds
        return reply

    def close(self) -> None:
        self.rpc.close()


class CloudBasedEdge:
    """The cloud-based deployment: the prompt goes up, the response comes down."""

    def __init__(self, address: str, max_new_tokens: int, timeout: float = 600.0,
                 context: zmq.Context | None = None, keys=None) -> None:
        self.max_new_tokens = max_new_tokens
        self._caller = _Caller(context or zmq.Context.instance(), address, timeout, keys)

    def generate(self, prompt_ids: list[int]) -> EdgeResult:
        stats = EdgeStats(prompt_tokens=len(prompt_ids))
        msg = bp.Generate(self._caller.next_seq(), self.max_new_tokens, tuple(prompt_ids))
        reply = self._caller.call(msg, stats)
        ids = list(reply.token_ids)
        stats.cloud_tokens = len(ids)
        # the reply carries no per-token probabilities: confidence is not known here (nan)
        records = [TokenRecord(len(prompt_ids) + i, t, "cloud", float("nan")) for i, t in enumerate(ids)]
        return EdgeResult(ids, records, stats)

    def close(self) -> None:
        self._caller.close()


class FullUploadEdge:
    """Edge partition plus a stateless cloud: every request carries every upload-layer row so far."""

    def __init__(self, model: torch.nn.Module, split: Split, heads: HeadSet, address: str, threshold: float,
                 fp16: bool, max_new_tokens: int, timeout: float = 600.0, context: zmq.Context | None = None,
                 keys=None) -> None:
        self.split = split
        self.heads = heads
        self.threshold = threshold
        self.max_new_tokens = max_new_tokens
        self.runner = DecoderRunner(model)
        self.eos = eos_ids(model)
        self.wire_dtype = torch_dtype(wire_dtype(name_of(model.dtype), fp16))  # as EdgeClient's
        self._caller = _Caller(context or zmq.Context.instance(), address, timeout, keys)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int]) -> EdgeResult:
        stats = EdgeStats(prompt_tokens=len(prompt_ids))
        result = EdgeResult([], [], stats)
        edge = EdgePartition(self.runner, self.split, self.heads, self.threshold, upload=True)
        hidden = self.runner.hidden_size
        np_dtype = numpy_dtype(name_of(self.wire_dtype))
        rows = np.empty((len(prompt_ids) + self.max_new_tokens, hidden), dtype=np_dtype)  # [positions, H]
        have = 0  # rows [0, have) are filled
        inputs, position = list(prompt_ids), len(prompt_ids)
        for _ in range(self.max_new_tokens):
            t0 = time.perf_counter()
            out = edge.step(inputs)
            for up in out.uploads:  # up.hidden [1, n, H]
                n = up.hidden.shape[1]
                assert up.start == have, f"upload rows arrive in order (got {up.start}, have {have})"
                rows[have:have + n] = to_numpy(up.hidden[0].to(self.wire_dtype).contiguous())
                have += n
            stats.edge_seconds += time.perf_counter() - t0
            if out.token is not None:
                stats.edge_tokens += 1
                token, by, conf = out.token, out.exit, out.confidence
            else:
                assert have == out.position + 1, f"every row up to {out.position} is uploaded (have {have})"
                reply = self._caller.call(bp.DecideFull(self._caller.next_seq(), rows[:have]), stats)
                stats.cloud_tokens += 1
                token, by, conf = reply.token, "cloud", reply.prob
            result.token_ids.append(token)
            result.tokens.append(TokenRecord(position, token, by, conf))
            if token in self.eos:
                break
            inputs, position = [token], position + 1
        return result

    def close(self) -> None:
        self._caller.close()
