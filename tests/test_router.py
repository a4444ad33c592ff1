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


def _requests_sent(backend):
    from cecollm.wire import broker_worker as wp

    return [(identity, msg.job, msg.left) for identity, *rest in backend.sent
            if isinstance(msg := wp.parse(rest), wp.Request)]


def test_new_devices_spread_over_workers_stay_with_theirs_and_a_worker_that_starts_over():
    from cecollm.broker.router import Broker
    from cecollm.wire import broker_worker as wp
    from cecollm.wire import edge_cloud as ep

    front, back = Collect(), Collect()
    broker = Broker(front, back, wp.Config("/m", "id", "float32", (2,), 2, "ipc:///x", 250, 4), max_batch=4)
    for worker, pid in ((b"w1", 1), (b"w2", 2)):
        broker.on_worker(frames_of(worker, *wp.Connect(pid).to_frames()))
        broker.on_worker(frames_of(worker, *wp.Ready().to_frames()))
    for device in (1, 2):
        broker.on_edge(frames_of(b"edge", b"", *ep.Decide(device, 1, 1, 5).to_frames()))
    broker.dispatch()
    assert _jobs_sent(back) == [(b"w1", 1), (b"w2", 2)]  # a new device goes to a worker serving no more than any
    broker.on_worker(frames_of(b"w1", *wp.Reply(1, Frames((b"answer",))).to_frames()))
    assert front.sent[-1] == [b"edge", b"", b"answer"]
    broker.on_worker(frames_of(b"w2", *wp.Reply(2, Frames((b"answer",))).to_frames()))
    broker.on_edge(frames_of(b"edge", b"", *ep.Decide(2, 2, 1, 6).to_frames()))  # job 3: device 2 again
    broker.dispatch()
    assert _jobs_sent(back)[-1] == (b"w2", 3)  # its worker, though w1 was free longer
    back.sent.clear()
    broker.on_worker(frames_of(b"w2", *wp.Connect(2).to_frames()))  # w2 starts over: job 3 must not be lost
    broker.on_worker(frames_of(b"w2", *wp.Ready().to_frames()))
    broker.dispatch()
    assert _jobs_sent(back) == [(b"w2", 3)]  # device 2 is new to the pool: the worker serving fewer devices
    broker.on_edge(frames_of(b"edge", b"", *ep.Decide(3, 1, 1, 3).to_frames()))
    broker.dispatch()
    assert _jobs_sent(back) == [(b"w2", 3), (b"w1", 4)]  # w2 is busy, w1 serves no more devices than it


def test_a_free_worker_gets_what_is_waiting_one_request_a_device():
    from cecollm.broker.router import Broker
    from cecollm.wire import broker_worker as wp
    from cecollm.wire import edge_cloud as ep

    front, back = Collect(), Collect()
    broker = Broker(front, back, wp.Config("/m", "id", "float32", (2,), 2, "ipc:///x", 250, 4), max_batch=3)
    broker.on_worker(frames_of(b"w1", *wp.Connect(1).to_frames()))
    broker.on_worker(frames_of(b"w1", *wp.Ready().to_frames()))
    for device, seq in ((1, 1), (1, 2), (2, 1), (3, 1), (4, 1)):  # jobs 1..5: device 1 twice
        broker.on_edge(frames_of(b"edge", b"", *ep.Decide(device, seq, 1, 5).to_frames()))
    broker.dispatch()
    assert _requests_sent(back) == [(b"w1", 1, 2), (b"w1", 3, 1), (b"w1", 4, 0)]  # one a device, `left` counting
    assert [j.number for j in broker.queue] == [2, 5]  # the rest wait, in order
    back.sent.clear()
    broker.on_worker(frames_of(b"w1", *wp.Reply(1, Frames((b"a",))).to_frames()))
    broker.on_worker(frames_of(b"w1", *wp.Reply(3, Frames((b"b",))).to_frames()))
    broker.dispatch()
    assert _requests_sent(back) == []  # the batch's last job is not answered: the worker is not free
    broker.on_worker(frames_of(b"w1", *wp.Defer(4).to_frames()))
    broker.dispatch()
    assert _requests_sent(back) == [(b"w1", 2, 1), (b"w1", 5, 0)]
    sizes = {s.labels.get("le"): s.value for s in broker.metrics.batch_size.collect()[0].samples
             if s.name.endswith("_bucket")}
    assert sizes["1.0"] == 0 and sizes["2.0"] == 1 and sizes["4.0"] == 2  # a batch of 3, then one of 2


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
