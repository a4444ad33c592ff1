"""The serving loops' drain: a handler that fails on one message does not stop the loop."""

from __future__ import annotations

import logging
import time

import zmq

from cecollm.wire.dispatch import drain
from cecollm.wire.wire import Frames

from conftest import Collect, frames_of


def test_a_failing_handler_is_logged_and_the_rest_are_served(caplog):
    context = zmq.Context.instance()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.LINGER, 0)
    pull.bind("inproc://test-drain")
    push.connect("inproc://test-drain")
    try:
        for word in (b"a", b"boom", b"c"):
            push.send(word)
        seen = []

        def handler(frames):
            if frames[0].bytes == b"boom":
                raise KeyError("a bug")
            seen.append(frames[0].bytes)

        assert pull.poll(10_000)
        with caplog.at_level(logging.ERROR):
            failed = drain(pull, handler, logging.getLogger("test"))
        assert failed == 1 and seen == [b"a", b"c"]
        assert "could not be handled" in caplog.text and "KeyError" in caplog.text
    finally:
        pull.close(0)
        push.close(0)


def _jobs_sent(backend):
    from cecollm.wire import broker_worker as wp

    out = []
    for identity, *rest in backend.sent:
        msg = wp.parse(rest)
        if isinstance(msg, wp.Request):
            out.append((identity, msg.job))
    return out


def test_least_recently_used_dispatch_and_a_worker_that_starts_over():
    from cecollm.broker.router import Broker
    from cecollm.wire import broker_worker as wp
    from cecollm.wire import edge_cloud as ep

    front, back = Collect(), Collect()
    broker = Broker(front, back, wp.Config("/m", "id", "float32", (2,), 2, "ipc:///x", 250, 4))
    for worker, pid in ((b"w1", 1), (b"w2", 2)):
        broker.on_worker(frames_of(worker, *wp.Connect(pid).to_frames()))
        broker.on_worker(frames_of(worker, *wp.Ready().to_frames()))
    for seq in (1, 2):
        broker.on_edge(frames_of(b"edge", b"", *ep.Decide(1, seq, 1, seq).to_frames()))
    broker.dispatch()
    assert _jobs_sent(back) == [(b"w1", 1), (b"w2", 2)]  # ready first, used first
    broker.on_worker(frames_of(b"w1", *wp.Reply(1, Frames((b"answer",))).to_frames()))
    assert front.sent[-1] == [b"edge", b"", b"answer"]
    back.sent.clear()
    broker.on_worker(frames_of(b"w2", *wp.Connect(2).to_frames()))  # w2 starts over: job 2 must not be lost
    broker.on_worker(frames_of(b"w2", *wp.Ready().to_frames()))
    broker.dispatch()
    assert _jobs_sent(back) == [(b"w1", 2)]  # w1 was free first
    broker.on_edge(frames_of(b"edge", b"", *ep.Decide(1, 3, 1, 3).to_frames()))
    broker.dispatch()
    assert _jobs_sent(back) == [(b"w1", 2), (b"w2", 3)]  # w2 once, never two jobs at a time


def _messages(sock, module):
    return [module.parse(frames[1:]) for frames in sock.sent]


def test_a_deferred_request_is_parked_holding_no_worker_until_its_rows_arrive():
    from cecollm.broker.router import Broker
    from cecollm.wire import broker_worker as wp
    from cecollm.wire import edge_cloud as ep
    from cecollm.wire import worker_state as sp
    from cecollm.wire.wire import ErrorCode

    front, back, state = Collect(), Collect(), Collect()
    broker = Broker(front, back, wp.Config("/m", "id", "float32", (2,), 2, "ipc:///x", 250, 4), state=state,
                    wait_seconds=2.0, max_per_device=2)
    broker.on_worker(frames_of(b"w1", *wp.Connect(1).to_frames()))
    broker.on_worker(frames_of(b"w1", *wp.Ready().to_frames()))
    broker.on_edge(frames_of(b"edge", b"", *ep.Decide(7, 1, 99, 12).to_frames()))
    broker.dispatch()
    broker.on_worker(frames_of(b"w1", *wp.Defer(1).to_frames()))  # its rows are not in yet
    assert [f[1:] for f in state.sent] == [sp.Watch(1, 7, 99, 1, 12).to_frames()]
    broker.on_edge(frames_of(b"other", b"", *ep.Decide(8, 1, 5, 3).to_frames()))
    broker.dispatch()
    assert _jobs_sent(back) == [(b"w1", 1), (b"w1", 2)]  # the worker is free for another device meanwhile
    broker.on_worker(frames_of(b"w1", *wp.Reply(2, Frames((b"answer",))).to_frames()))
    broker.on_state([b"", *sp.Arrived(1).to_frames()])  # the content manager: job 1 may go
    broker.dispatch()
    assert _jobs_sent(back)[-1] == (b"w1", 1)
    broker.on_worker(frames_of(b"w1", *wp.Defer(1).to_frames()))  # still not grantable: parked again
    for seq in (2, 3):  # a device past its limit of requests in the broker is told so at once
        broker.on_edge(frames_of(b"edge", b"", *ep.Decide(7, seq, 99, 12).to_frames()))
    busy = ep.parse(front.sent[-1][2:])
    assert busy.code == ErrorCode.BUSY and busy.seq == 3
    broker.expire_parked(time.monotonic() + 3)  # its rows never came
    missing = [ep.parse(f[2:]) for f in front.sent if f[0] == b"edge"]
    assert [(m.seq, m.code) for m in missing] == [(3, ErrorCode.BUSY), (1, ErrorCode.MISSING)]
    assert broker.in_broker[7] == 1  # request 2 is still queued; the others left the broker


def test_a_worker_that_holds_a_job_too_long_is_dropped_and_its_job_goes_to_another():
    from cecollm.broker.router import Broker
    from cecollm.wire import broker_worker as wp
    from cecollm.wire import edge_cloud as ep

    front, back = Collect(), Collect()
    broker = Broker(front, back, wp.Config("/m", "id", "float32", (2,), 2, "ipc:///x", 250, 4), job_seconds=0.5)
    for worker, pid in ((b"w1", 11), (b"w2", 12)):
        broker.on_worker(frames_of(worker, *wp.Connect(pid).to_frames()))
        broker.on_worker(frames_of(worker, *wp.Ready().to_frames()))
    broker.on_edge(frames_of(b"edge", b"", *ep.Decide(1, 1, 1, 1).to_frames()))
    broker.dispatch()
    now = time.monotonic()
    broker.on_worker(frames_of(b"w1", *wp.Heartbeat().to_frames()))  # it beats, but never answers
    broker.purge(now + 0.3)
    assert broker.hung == []
    broker.purge(now + 0.7)  # past the job's deadline, well within the heartbeats' liveness
    assert broker.hung == [11] and broker.pool.get(b"w1") is None
    assert isinstance(wp.parse(back.sent[-1][1:]), wp.Disconnect) and back.sent[-1][0] == b"w1"
    broker.dispatch()
    assert _jobs_sent(back)[-1] == (b"w2", 1)
