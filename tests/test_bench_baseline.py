"""The stateless baseline cloud and its edge runners, in one process over inproc sockets."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zmq
from test_engine import confident_heads

from cecollm.bench.baselines import protocol as bp
from cecollm.bench.baselines.edge import BaselineCloudError, CloudBasedEdge, FullUploadEdge
from cecollm.bench.baselines.server import StatelessCloud, serve
from cecollm.config import GenerationConfig
from cecollm.edge.heads import HeadSet
from cecollm.engine import SplitEngine
from cecollm.split import Split
from cecollm.wire.rpc import RpcSocket
from cecollm.wire.wire import ErrorCode

from conftest import hf_greedy, make_tiny_model

PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 11], [1, 2, 3], [300, 12, 12, 12, 45, 9, 9, 81, 160, 33, 2, 77]]


@pytest.fixture
def tiny_cloud():
    """(model, split, heads, context, address) with a baseline cloud serving in a thread."""
    torch.set_num_threads(1)
    model = make_tiny_model("gqa")
    split = Split.create(model.config.num_hidden_layers, (2, 4))
    heads = HeadSet.lens(model, split.exits)
    context = zmq.Context()
    address = "inproc://baseline-cloud"
    ready, stop = threading.Event(), threading.Event()

    def run():
        sock = context.socket(zmq.ROUTER)
        sock.bind(address)
        ready.set()
        try:
            serve(sock, StatelessCloud(model, split), lambda: not stop.is_set(), poll_ms=20)
        finally:
            sock.close(0)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield model, split, heads, context, address
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    context.term()


def test_naive_at_threshold_1_float32_is_the_full_model(tiny_cloud):
    model, split, heads, context, address = tiny_cloud
    edge = FullUploadEdge(model, split, heads, address, threshold=1.0, fp16=False, max_new_tokens=20,
                          context=context)
    try:
        for prompt in PROMPTS:
            result = edge.generate(prompt)
            assert result.token_ids == hf_greedy(model, prompt, 20)
            s = result.stats
            assert s.cloud_tokens == len(result.token_ids) and s.edge_tokens == 0
            # every request carries all rows so far: bytes grow quadratically with length
            hidden = model.config.hidden_size
            rows = sum(len(prompt) + i for i in range(len(result.token_ids)))
            assert s.bytes_up >= rows * hidden * 4
            assert s.cloud_seconds > 0 and s.edge_seconds > 0
    finally:
        edge.close()


def test_full_upload_with_exits_matches_the_split_engine(tiny_cloud):
    """With exits (float32) the stateless cloud decides exactly what the split engine's cloud decides."""
    model, split, heads, context, address = tiny_cloud
    heads = confident_heads(model, split.exits)
    engine = SplitEngine(model, split, heads)
    edge = FullUploadEdge(model, split, heads, address, threshold=0.8, fp16=False, max_new_tokens=24,
                          context=context)
    try:
        exits_seen = cloud_seen = 0
        for prompt in PROMPTS:
            got = edge.generate(prompt)
            want = engine.generate(prompt, GenerationConfig("collab", threshold=0.8, max_new_tokens=24, fp16=False))
            assert got.token_ids == want.token_ids
            assert [t.decided_by for t in got.tokens] == [t.decided_by for t in want.tokens]
            exits_seen += got.stats.edge_tokens
            cloud_seen += got.stats.cloud_tokens
        assert exits_seen > 0 and cloud_seen > 0, "confident heads let some exit decide, not all"
    finally:
        edge.close()


def test_float16_halves_the_bytes(tiny_cloud):
    model, split, heads, context, address = tiny_cloud
    got = {}
    for fp16 in (False, True):
        edge = FullUploadEdge(model, split, heads, address, threshold=1.0, fp16=fp16, max_new_tokens=8,
                              context=context)
        try:
            got[fp16] = edge.generate(PROMPTS[0])
        finally:
            edge.close()
    assert len(got[True].token_ids) == len(got[False].token_ids) == 8
    ratio = got[True].stats.bytes_up / got[False].stats.bytes_up
    assert 0.45 < ratio < 0.6


def test_cloud_based_generate(tiny_cloud):
    model, split, heads, context, address = tiny_cloud
    edge = CloudBasedEdge(address, max_new_tokens=15, context=context)
    try:
        for prompt in PROMPTS:
            result = edge.generate(prompt)
            assert result.token_ids == hf_greedy(model, prompt, 15)
            assert result.stats.edge_seconds == 0 and result.stats.cloud_seconds > 0
            assert result.stats.bytes_up < 200  # ids, not hidden states
    finally:
        edge.close()


def test_bad_requests_get_errors_and_the_server_keeps_serving(tiny_cloud):
    model, split, heads, context, address = tiny_cloud
    rpc = RpcSocket(context, address)
    try:
        def ask(frames):
            rpc.send(frames)
            import time
            return bp.parse(rpc.receive(time.monotonic() + 10), bp.REPLIES)

        assert ask([b"junk"]).code == ErrorCode.MALFORMED
        wrong_width = bp.DecideFull(5, np.zeros((3, 7), np.float32))
        reply = ask(wrong_width.to_frames())
        assert reply.code == ErrorCode.MALFORMED and reply.seq == 5 and "hidden size" in reply.message
        reply = ask(bp.Generate(6, 4, (10**6,)).to_frames())
        assert reply.code == ErrorCode.MALFORMED and "vocabulary" in reply.message
        reply = ask(bp.Generate(7, 4, (1, 2)).to_frames())
        assert isinstance(reply, bp.Response) and len(reply.token_ids) == 4
    finally:
        rpc.close()


def test_an_error_reply_is_raised_not_hidden(tiny_cloud):
    model, split, heads, context, address = tiny_cloud
    wrong = make_tiny_model("mha")  # another width: the cloud refuses its rows
    edge = FullUploadEdge(wrong, Split.create(6, (2, 4)), HeadSet.lens(wrong, (2, 4)), address, threshold=1.0,
                          fp16=False, max_new_tokens=4, context=context)
    try:
        with pytest.raises(BaselineCloudError, match="hidden size"):
            edge.generate([1, 2, 3])
    finally:
        edge.close()
