"""The content manager's records: sessions, uploads, leases, budget, TTL, dropped rows."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from cecollm.cache import shm
from cecollm.cache.content_manager import ContentManager, ContentManagerConfig
from cecollm.dtypes import numpy_dtype
from cecollm.wire import edge_cloud as ep
from cecollm.wire import worker_state as sp
from cecollm.wire.wire import DTYPE_CODES, ErrorCode

F16 = DTYPE_CODES["float16"]
HIDDEN = 1024  # one float16 row = 2 KiB, so two rows fill a page


class FakeSocket:
    """Collects what the manager sends to workers."""

    def __init__(self):
        self.sent = []

    def send_multipart(self, frames, copy=True):
        self.sent.append((frames[0], sp.parse([bytes(f) for f in frames[2:]])))

    def take(self):
        out, self.sent = self.sent, []
        return out


@pytest.fixture
def manager():
    prefix = f"cecollm-test-{os.getpid()}-"
    config = ContentManagerConfig("inproc://unused-up", "inproc://unused-state", cloud_layers=2, n_kv_heads=1,
                                  head_dim=8, hidden=HIDDEN, capacity=64, budget_bytes=1 << 30, idle_ttl=60.0,
                                  segment_prefix=prefix)
    m = ContentManager(config)
    m.state = FakeSocket()
    yield m
    m.release_all()
    assert not shm.remove_leftovers(prefix), "every segment is unlinked on release"


def _open(m, device=3):
    opened = m.open(sp.Open(device, F16))
    assert isinstance(opened, sp.Opened)
    return opened


def _upload(m, device, session, seq, start, n, value=1.0):
    rows = np.full((n, HIDDEN), value, dtype=np.float16)
    m.on_upload([bytes(f) for f in ep.Upload(device, session, seq, start, rows).to_frames()])


def test_open_upload_lease_commit_and_release(manager):
    opened = _open(manager)
    assert os.path.exists(f"/dev/shm/{opened.segment}")
    _upload(manager, 3, opened.session, 0, 0, 3, 2.0)
    dev = manager.devices[3]
    assert dev.received == 3
    begin, end = dev.layout.rows_span(0, 3)
    assert np.all(np.frombuffer(dev.segment.buf[begin:end], dtype=np.float16) == 2.0)
    manager.lease(sp.Lease(3, opened.session, 1, 2), b"w1")
    (peer, grant), = manager.state.take()
    assert peer == b"w1" and isinstance(grant, sp.Grant) and (grant.folded, grant.received) == (0, 3)
    assert manager.commit(sp.Commit(3, grant.token, 3, 0, 0.0)) is None
    assert dev.folded == 3 and dev.lease_token == 0
    manager.on_upload([bytes(f) for f in ep.End(3, opened.session).to_frames()])
    assert 3 not in manager.devices and not os.path.exists(f"/dev/shm/{opened.segment}")
    manager.lease(sp.Lease(3, opened.session, 2, 3), b"w1")
    (_, err), = manager.state.take()
    assert err.code == ErrorCode.UNKNOWN_DEVICE and "ended" in err.message


def test_a_lease_never_waits_and_a_watch_hears_when_the_rows_are_in(manager):
    opened = _open(manager)
    manager.lease(sp.Lease(3, opened.session, 1, 1), b"w1")
    (_, err), = manager.state.take()
    assert err.code == ErrorCode.NOT_YET  # at once: the worker is free, the broker parks the request
    manager.on_watch(sp.Watch(41, 3, opened.session, 1, 1), b"broker")
    assert manager.state.take() == []
    _upload(manager, 3, opened.session, 0, 0, 1)
    assert manager.state.take() == []  # position 1 is still missing
    _upload(manager, 3, opened.session, 1, 1, 1)
    (peer, arrived), = manager.state.take()
    assert peer == b"broker" and arrived == sp.Arrived(41)
    manager.lease(sp.Lease(3, opened.session, 1, 1), b"w2")
    (_, grant), = manager.state.take()
    assert isinstance(grant, sp.Grant)
    manager.on_watch(sp.Watch(42, 3, opened.session + 1, 2, 5), b"broker")  # a session that is not open: go at once
    manager.on_watch(sp.Watch(43, 3, opened.session, 3, 0), b"broker")  # position 0 is in: go when the lease ends
    assert manager.state.take() == [(b"broker", sp.Arrived(42))]
    manager.commit(sp.Commit(3, grant.token, 2, 0, 0.0))
    assert manager.state.take() == [(b"broker", sp.Arrived(43))]
    manager.lease(sp.Lease(3, opened.session, 2, 0), b"w1")  # position 0 was decided: never granted again
    assert manager.state.take()[0][1].code == ErrorCode.STALE
    manager.on_watch(sp.Watch(44, 3, opened.session, 4, 9), b"broker")
    manager.on_upload([bytes(f) for f in ep.End(3, opened.session).to_frames()])
    assert manager.state.take() == [(b"broker", sp.Arrived(44))]  # released: its lease will say why


def test_one_worker_at_a_time_and_a_retried_request_supersedes(manager):
    opened = _open(manager)
    _upload(manager, 3, opened.session, 0, 0, 4)
    manager.lease(sp.Lease(3, opened.session, 7, 1), b"w1")
    (_, first), = manager.state.take()
    manager.lease(sp.Lease(3, opened.session, 8, 2), b"w2")  # another request: not while w1 holds the device
    (_, busy), = manager.state.take()
    assert busy.code == ErrorCode.NOT_YET
    manager.on_watch(sp.Watch(8, 3, opened.session, 8, 2), b"broker")
    manager.lease(sp.Lease(3, opened.session, 7, 1), b"w3")  # request 7 again (w1 died): takes over
    (peer, second), = manager.state.take()
    assert peer == b"w3" and second.token != first.token
    assert "not current" in manager.commit(sp.Commit(3, first.token, 2, 0, 0.0))  # w1's lease is gone
    assert manager.commit(sp.Commit(3, second.token, 2, 0, 0.0)) is None
    assert manager.state.take() == [(b"broker", sp.Arrived(8))]  # request 8 may go now
    manager.lease(sp.Lease(3, opened.session, 8, 2), b"w2")
    (peer, third), = manager.state.take()
    assert peer == b"w2" and third.folded == 2
    assert "outside" in manager.commit(sp.Commit(3, third.token, 99, 0, 0.0))  # more than it received


def test_bad_uploads_break_the_session_and_leases_hear_why(manager):
    opened = _open(manager)
    _upload(manager, 3, opened.session, 1, 0, 1)  # seq gap
    manager.lease(sp.Lease(3, opened.session, 1, 0), b"w1")
    (_, err), = manager.state.take()
    assert err.code == ErrorCode.MISSING and "seq" in err.message
    other = _open(manager, 4)
    rows = np.zeros((1, HIDDEN + 1), dtype=np.float16)  # wrong width
    manager.on_upload([bytes(f) for f in ep.Upload(4, other.session, 0, 0, rows).to_frames()])
    assert manager.devices[4].broken
    _upload(manager, 99, 1, 0, 0, 1)  # unknown device: refused, nothing breaks
    _upload(manager, 4, other.session + 1, 0, 0, 1)  # stale session
    manager.on_upload([b"garbage"])


def test_capacity_and_stale_positions(manager):
    opened = _open(manager)
    manager.lease(sp.Lease(3, opened.session, 1, 64), b"w")
    assert manager.state.take()[0][1].code == ErrorCode.CAPACITY
    _upload(manager, 3, opened.session, 0, 0, 60)
    _upload(manager, 3, opened.session, 1, 60, 5)  # beyond capacity
    assert "capacity" in manager.devices[3].broken


def test_budget_evicts_least_recently_used_idle_device(manager):
    per_device = _open(manager, 1) and manager.devices[1].layout.nbytes
    manager.release_all()
    manager.config = ContentManagerConfig(**{**manager.config.__dict__, "budget_bytes": 2 * per_device})
    a, b = _open(manager, 1), _open(manager, 2)
    _upload(manager, 1, a.session, 0, 0, 1)  # device 1 used last: device 2 is the LRU one
    _open(manager, 3)
    assert sorted(manager.devices) == [1, 3]
    manager.lease(sp.Lease(2, b.session, 1, 0), b"w")
    assert "byte budget" in manager.state.take()[0][1].message
    _upload(manager, 1, a.session, 1, 1, 1)
    manager.lease(sp.Lease(1, a.session, 1, 0), b"w")  # device 1 is busy now
    manager.state.take()
    manager.on_watch(sp.Watch(9, 3, manager.devices[3].session, 1, 0), b"broker")  # parked: device 3 is not idle either
    refused = manager.open(sp.Open(4, F16))
    assert refused.code == ErrorCode.BUDGET
    assert str(manager.used_bytes) not in refused.message  # says nothing of what other devices hold


def test_idle_ttl_releases(manager):
    opened = _open(manager)
    manager.housekeeping(time.monotonic() + 30)
    assert 3 in manager.devices
    manager.housekeeping(time.monotonic() + 61)
    assert 3 not in manager.devices and not os.path.exists(f"/dev/shm/{opened.segment}")


def test_folded_rows_are_dropped(manager):
    opened = _open(manager)
    _upload(manager, 3, opened.session, 0, 0, 8, 3.0)
    dev = manager.devices[3]
    manager.lease(sp.Lease(3, opened.session, 1, 4), b"w")
    (_, grant), = manager.state.take()
    manager.commit(sp.Commit(3, grant.token, 5, 0, 0.0))
    begin, end = dev.layout.rows_span(0, 8)
    rows = np.frombuffer(dev.segment.buf[begin:end], dtype=np.float16).reshape(8, HIDDEN)
    assert np.all(rows[:4] == 0)  # rows 0..3 fill two whole pages: given back, read as zeros
    assert np.all(rows[4:] == 3.0)  # row 4 shares a page with row 5, which is still needed


def test_a_commit_without_a_lease_changes_nothing(manager):
    opened = _open(manager)
    _upload(manager, 3, opened.session, 0, 0, 4)
    assert "not current" in manager.commit(sp.Commit(3, 0, 4, 0, 0.0))  # no lease is held: token 0
    assert manager.devices[3].folded == 0


def test_a_retried_request_whose_worker_died_after_committing_gets_the_answer(manager):
    """The first worker folded the position and committed, then died before its reply left: the
    retry (same request seq) cannot compute again (the KV holds the position), so it is told the answer."""
    opened = _open(manager)
    _upload(manager, 3, opened.session, 0, 0, 4)
    manager.lease(sp.Lease(3, opened.session, 7, 3), b"w1")
    (_, grant), = manager.state.take()
    assert manager.commit(sp.Commit(3, grant.token, 4, 1234, 0.75)) is None
    manager.lease(sp.Lease(3, opened.session, 7, 3), b"w2")  # the broker retries request 7
    (peer, answer), = manager.state.take()
    assert peer == b"w2" and answer == sp.Decided(3, 1234, 0.75)
    manager.lease(sp.Lease(3, opened.session, 8, 3), b"w2")  # another request for a decided position
    assert manager.state.take()[0][1].code == ErrorCode.STALE


def test_no_room_in_dev_shm_is_an_error_reply_not_a_crash(manager, monkeypatch):
    def full(name, nbytes):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm, "create", full)
    refused = manager.open(sp.Open(3, F16))
    assert refused.code == ErrorCode.BUDGET and "No space" in refused.message
    assert manager.used_bytes == 0 and 3 not in manager.devices


def _control(m, peer, msg):
    """A worker's message through the manager's socket handler (envelope and all); the replies."""
    import zmq

    m.on_control([zmq.Frame(peer), zmq.Frame(b""), *(zmq.Frame(bytes(f)) for f in msg.to_frames())])
    return m.state.take()


def test_a_remote_worker_gets_the_state_as_tensors_and_commits_kv_into_the_segment(manager):
    opened = _open(manager)
    _upload(manager, 3, opened.session, 0, 0, 5, 2.0)
    dev = manager.devices[3]
    (_, grant), = _control(manager, b"r1", sp.Lease(3, opened.session, 1, 2, remote=True))
    assert isinstance(grant, sp.StateGrant) and (grant.folded, grant.received, grant.wire_code) == (0, 5, F16)
    assert grant.kv.shape == (4, 1, 0, 8) and grant.rows.shape == (5, HIDDEN) and np.all(grant.rows == 2.0)
    kv = np.arange(4 * 3 * 8, dtype=np.float32).reshape(4, 1, 3, 8)  # [L*2, kv, 3 positions, hd]
    (_, reply), = _control(manager, b"r1", sp.StateCommit(3, grant.token, 0, 3, 42, 0.25, kv))
    assert reply == sp.Committed(3) and dev.folded == 3 and dev.lease_token == 0
    segment_kv = np.ndarray(dev.layout.kv_shape, dtype=np.float32, buffer=dev.segment.buf, offset=dev.layout.kv_offset)
    assert np.array_equal(segment_kv[:, :, :, :3].reshape(4, 1, 3, 8), kv)  # [L, 2, kv, 3, hd] as sent
    del segment_kv
    (_, grant), = _control(manager, b"r1", sp.Lease(3, opened.session, 2, 4, remote=True))
    assert (grant.folded, grant.received) == (3, 5) and np.array_equal(grant.kv, kv) and grant.rows.shape == (2, HIDDEN)
    # a local worker's lease on the same device still gets the segment's name
    assert _control(manager, b"r1", sp.StateCommit(3, grant.token, 3, 4, 1, 0.5, kv[:, :, :1].copy()))
    (_, local), = _control(manager, b"w1", sp.Lease(3, opened.session, 3, 4))
    assert isinstance(local, sp.Grant) and local.segment == opened.segment and local.folded == 4


def test_a_bad_remote_commit_is_an_error_reply_and_changes_nothing(manager):
    opened = _open(manager)
    _upload(manager, 3, opened.session, 0, 0, 5)
    dev = manager.devices[3]
    (_, grant), = _control(manager, b"r1", sp.Lease(3, opened.session, 1, 2, remote=True))
    good = np.ones((4, 1, 3, 8), dtype=np.float32)
    bad = {
        "wrong heads": (ErrorCode.MALFORMED, sp.StateCommit(3, grant.token, 0, 3, 1, 0.5, np.ones((4, 2, 3, 8), np.float32))),
        "wrong layers": (ErrorCode.MALFORMED, sp.StateCommit(3, grant.token, 0, 3, 1, 0.5, np.ones((6, 1, 3, 8), np.float32))),
        "wrong dtype": (ErrorCode.MALFORMED, sp.StateCommit(3, grant.token, 0, 3, 1, 0.5, good.astype(np.float16))),
        "wrong start": (ErrorCode.MALFORMED, sp.StateCommit(3, grant.token, 1, 4, 1, 0.5, good)),
        "past received": (ErrorCode.MALFORMED, sp.StateCommit(3, grant.token, 0, 6, 1, 0.5, np.ones((4, 1, 6, 8), np.float32))),
        "not the lease": (ErrorCode.STALE, sp.StateCommit(3, grant.token + 1, 0, 3, 1, 0.5, good)),
        "unknown device": (ErrorCode.STALE, sp.StateCommit(9, grant.token, 0, 3, 1, 0.5, good)),
    }
    for name, (code, msg) in bad.items():
        (_, reply), = _control(manager, b"r1", msg)
        assert isinstance(reply, sp.Error) and reply.code == code, name
        assert (dev.folded, dev.lease_token) == (0, grant.token), name
    import zmq  # frames that do not parse: an error reply too

    manager.on_control([zmq.Frame(b"r1"), zmq.Frame(b""), zmq.Frame(sp.StateCommit(3, grant.token, 0, 3, 1, 0.5, good)
                                                                     .to_frames()[0]), zmq.Frame(b"x")])
    assert manager.state.take()[0][1].code == ErrorCode.MALFORMED
    (_, reply), = _control(manager, b"r1", sp.StateCommit(3, grant.token, 0, 3, 1, 0.5, good))
    assert reply == sp.Committed(3) and dev.folded == 3


def test_a_bfloat16_kv_travels_to_remote_workers(manager):
    """A bfloat16 model's KV (2 bytes an element) is granted as a bfloat16 tensor (ml_dtypes on the numpy side)."""
    manager.config = ContentManagerConfig(**{**manager.config.__dict__, "kv_dtype": "bfloat16"})
    opened = _open(manager)
    _upload(manager, 3, opened.session, 0, 0, 2)
    (_, grant), = _control(manager, b"r1", sp.Lease(3, opened.session, 1, 1, remote=True))
    assert isinstance(grant, sp.StateGrant) and grant.kv.dtype == numpy_dtype("bfloat16")
    assert manager.devices[3].layout.kv_itemsize == 2 and grant.rows.shape[0] == 2


def _drafted(m, device, session, seq, start, n, drafts, epoch=0):
    rows = np.ones((n, HIDDEN), dtype=np.float16)
    m.on_upload([bytes(f) for f in ep.Upload(device, session, seq, start, rows, epoch=epoch, drafts=drafts).to_frames()])


def test_a_verifying_lease_gets_the_drafts_and_a_roll_back_begins_the_next_epoch(manager):
    opened = _open(manager)
    _drafted(manager, 3, opened.session, 0, 0, 4, (ep.NO_DRAFT, ep.NO_DRAFT, 11, 12))
    manager.lease(sp.Lease(3, opened.session, 1, 3, verify=True, epoch=0), b"w1")
    (_, grant), = manager.state.take()
    assert grant.drafts == (ep.NO_DRAFT, ep.NO_DRAFT, 11, 12)
    manager.on_rollback(sp.Rollback(3, grant.token, 3, 50, 0.9), b"w1")  # the draft after row 2 was wrong
    (_, done), = manager.state.take()
    dev = manager.devices[3]
    assert done == sp.Committed(3) and (dev.folded, dev.received, dev.epoch, dev.upload_seq) == (3, 3, 1, 0)
    assert dev.drafts[3] == ep.NO_DRAFT and dev.answer == sp.Decided(2, 50, 0.9)
    _drafted(manager, 3, opened.session, 5, 4, 2, (7, 8), epoch=0)  # in flight before the edge heard: dropped
    assert dev.received == 3 and dev.stale_uploads == 1 and not dev.broken
    _drafted(manager, 3, opened.session, 0, 3, 2, (60, 61), epoch=1)  # the new epoch, numbered from 0
    assert dev.received == 5 and not dev.broken
    manager.lease(sp.Lease(3, opened.session, 2, 4, verify=True, epoch=0), b"w1")  # asked in the old epoch
    (_, err), = manager.state.take()
    assert err.code == ErrorCode.STALE and "epoch 0 is over" in err.message
    manager.lease(sp.Lease(3, opened.session, 1, 3, verify=True, epoch=0), b"w2")  # request 1 retried: its answer
    (_, again), = manager.state.take()
    assert again == sp.Decided(2, 50, 0.9)
    manager.lease(sp.Lease(3, opened.session, 3, 4, verify=True, epoch=1), b"w1")
    (_, grant), = manager.state.take()
    assert (grant.folded, grant.received, grant.drafts) == (3, 5, (60, 61))


def test_uploads_from_a_future_epoch_break_the_session(manager):
    opened = _open(manager)
    _drafted(manager, 3, opened.session, 0, 0, 2, (1, 2), epoch=4)
    assert "epoch 4" in manager.devices[3].broken
    with pytest.raises(ValueError, match="drafts for"):
        ep.Upload(3, 1, 0, 0, np.ones((2, HIDDEN), np.float16), drafts=(1,))  # one draft a row, or none


def test_a_roll_back_of_a_lease_that_is_not_current_is_refused(manager):
    opened = _open(manager)
    _drafted(manager, 3, opened.session, 0, 0, 2, (1, 2))
    manager.on_rollback(sp.Rollback(3, 12345, 1, 5, 0.5), b"w1")
    (_, err), = manager.state.take()
    assert err.code == ErrorCode.STALE and manager.devices[3].epoch == 0


def test_a_parked_retry_of_a_request_that_holds_the_lease_or_got_its_answer_goes_at_once(manager):
    opened = _open(manager)
    _upload(manager, 3, opened.session, 0, 0, 3)
    manager.lease(sp.Lease(3, opened.session, 5, 1), b"w1")  # granted, but w1's worker gave up waiting for it
    (_, grant), = manager.state.take()
    manager.on_watch(sp.Watch(70, 3, opened.session, 5, 1), b"broker")  # request 5 again: it may take its lease
    manager.on_watch(sp.Watch(71, 3, opened.session, 6, 2), b"broker")  # another request waits for the lease
    assert manager.state.take() == [(b"broker", sp.Arrived(70))]
    manager.commit(sp.Commit(3, grant.token, 2, 42, 0.5))
    assert manager.state.take() == [(b"broker", sp.Arrived(71))]
    manager.on_watch(sp.Watch(72, 3, opened.session, 5, 1), b"broker")  # request 5 once more: its answer is noted
    assert manager.state.take() == [(b"broker", sp.Arrived(72))]
    manager.lease(sp.Lease(3, opened.session, 5, 1), b"w2")
    (_, decided), = manager.state.take()
    assert decided == sp.Decided(1, 42, 0.5)


def test_a_second_edge_is_refused_while_the_first_uses_the_device_unless_it_takes_over(manager):
    first = manager.open(sp.Open(3, F16, instance=11))
    assert isinstance(first, sp.Opened) and manager.devices[3].owner == 11
    refused = manager.open(sp.Open(3, F16, instance=22))
    assert refused.code == ErrorCode.IN_USE and "--take-over" in refused.message
    again = manager.open(sp.Open(3, F16, instance=11))  # the same edge opens its next generation
    assert isinstance(again, sp.Opened) and again.session != first.session
    taken = manager.open(sp.Open(3, F16, instance=22, take_over=True))
    assert isinstance(taken, sp.Opened) and manager.devices[3].owner == 22
    manager.devices[3].last_used -= manager.config.claim_seconds + 1  # that edge went quiet long ago
    assert isinstance(manager.open(sp.Open(3, F16, instance=33)), sp.Opened)
    sessions = {manager.open(sp.Open(4, F16, instance=44)).session for _ in range(16)}
    assert len(sessions) == 16 and max(sessions) > 1 << 40  # 64 random bits, not a counter


def test_a_kept_lease_is_in_the_segment_header_and_another_workers_lease_takes_it_over(manager):
    opened = _open(manager)
    dev = manager.devices[3]
    header = shm.header(shm.attach(opened.segment).buf)  # what a worker on this host reads
    _upload(manager, 3, opened.session, 0, 0, 3)
    assert int(header[shm.RECEIVED]) == 3 and int(header[shm.LEASE]) == 0
    manager.lease(sp.Lease(3, opened.session, 1, 2), b"w1")
    (_, grant), = manager.state.take()
    assert int(header[shm.LEASE]) == grant.token
    assert manager.commit(sp.Commit(3, grant.token, 3, 42, 0.5, seq=1, keep=True)) is None
    assert dev.lease_token == grant.token and not dev.leased(time.monotonic())  # kept, not computing
    assert int(header[shm.LEASE]) == grant.token and dev.answer == sp.Decided(2, 42, 0.5)
    _upload(manager, 3, opened.session, 1, 3, 2)
    assert int(header[shm.RECEIVED]) == 5
    # w1 served request 2 on its kept lease without asking; its commit names the request
    assert manager.commit(sp.Commit(3, grant.token, 4, 43, 0.25, seq=2, keep=True)) is None
    assert dev.folded == 4 and (dev.answer_seq, dev.answer) == (2, sp.Decided(3, 43, 0.25))
    manager.lease(sp.Lease(3, opened.session, 3, 4), b"w2")  # another worker: it takes the kept lease over
    (peer, taken), = manager.state.take()
    assert peer == b"w2" and isinstance(taken, sp.Grant) and taken.folded == 4 and taken.token != grant.token
    assert int(header[shm.LEASE]) == taken.token  # w1 sees that its lease is gone
    assert manager.commit(sp.Commit(3, grant.token, 5, 44, 0.5, seq=3, keep=True)) is not None  # w1's is refused
    manager.on_upload([bytes(f) for f in ep.End(3, opened.session).to_frames()])
    assert int(header[shm.LEASE]) == 0  # the session ended: no worker's lease is current
    del header


class _DeviceMachine:
    """Random uploads, leases kept or ended, roll-backs and take-overs on one device: the segment's header (what
    a worker keeping a lease reads) always says what the content manager's record says."""

    def __init__(self, manager):
        self.m = manager
        self.opened = _open(manager)
        self.dev = manager.devices[3]
        self.header = shm.header(self.dev.segment.buf)
        self.token = 0  # the lease a worker holds (kept or computing), 0: none
        self.computing = False  # a worker computes on it (between LEASE and its COMMIT or ROLLBACK)
        self.seq = 1

    def upload(self, n):
        dev = self.dev
        if dev.received + n <= dev.layout.capacity:
            _upload(self.m, 3, self.opened.session, dev.upload_seq, dev.received, n)
            assert dev.epoch == int(self.header[shm.EPOCH])

    def lease(self, worker):
        dev = self.dev
        if dev.received == dev.folded:
            return
        self.seq += 1
        self.m.lease(sp.Lease(3, self.opened.session, self.seq, dev.received - 1), worker)
        (_, grant), = self.m.state.take()
        if self.computing:  # another request is being computed: this one waits
            assert isinstance(grant, sp.Error) and grant.code == ErrorCode.NOT_YET, grant
            return
        assert isinstance(grant, sp.Grant), grant  # a kept lease never blocks another worker's lease
        self.token, self.computing = grant.token, True

    def end(self, keep, rollback, upto):
        dev = self.dev
        if not self.token or dev.received == dev.folded:
            return
        folded = dev.folded + 1 + upto % (dev.received - dev.folded)
        ending = (sp.Rollback if rollback else sp.Commit)(3, self.token, folded, 7, 0.5, self.seq, keep=keep)
        assert self.m.commit(ending) is None
        self.computing = False
        if not keep:
            self.token = 0

    def check(self):
        dev = self.dev
        assert int(self.header[shm.RECEIVED]) == dev.received and int(self.header[shm.EPOCH]) == dev.epoch
        assert int(self.header[shm.LEASE]) == dev.lease_token == self.token
        assert dev.folded <= dev.received


def test_the_segment_header_follows_the_record_through_any_sequence(manager):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.one_of(st.tuples(st.just("upload"), st.integers(1, 5)),
                             st.tuples(st.just("lease"), st.sampled_from([b"w1", b"w2"])),
                             st.tuples(st.just("end"), st.booleans(), st.booleans(), st.integers(0, 10))),
                   max_size=40)

    @settings(max_examples=60, deadline=None)
    @given(ops)
    def run(steps):
        machine = _DeviceMachine(manager)
        try:
            for op, *args in steps:
                getattr(machine, op)(*args)
                machine.check()
        finally:
            del machine.header
            manager.release(manager.devices[3], "the example ended")

    run()
