"""The edge client's pieces that need no cloud: prompts, addresses, the tapped last exit."""

from __future__ import annotations

import pytest
import torch

from cecollm.edge.client import EdgeConfig, _TappingRunner
from cecollm.edge.heads import HeadSet
from cecollm.edge.partition import EdgePartition
from cecollm.split import Split

from conftest import make_tiny_model


def test_upload_address_and_shm_follow_the_broker_address():
    assert EdgeConfig(broker="tcp://host:7000").upload_address == "tcp://host:7001"
    assert EdgeConfig(broker="tcp://host:7000", upload="tcp://other:1").upload_address == "tcp://other:1"
    ipc = EdgeConfig(broker="ipc:///tmp/x.requests")
    assert ipc.upload_address == "ipc:///tmp/x.uploads" and ipc.use_shm
    assert not EdgeConfig(broker="tcp://h:1").use_shm and EdgeConfig(broker="tcp://h:1", shm=True).use_shm
    with pytest.raises(ValueError):
        _ = EdgeConfig(broker="ipc:///tmp/x").upload_address


def test_the_tapped_row_gives_the_standalone_token():
    """When no exit decides, the last exit's head on the tapped row is what standalone would pick."""
    torch.manual_seed(0)
    model = make_tiny_model("mha")
    split = Split.create(model.config.num_hidden_layers, (2, 4))
    heads = HeadSet.lens(model, split.exits)
    runner = _TappingRunner(model, split.last_exit)
    collab = EdgePartition(runner, split, heads, threshold=1.0)
    alone = EdgePartition(_TappingRunner(model, split.last_exit), split, heads, threshold=1.0, last_exit_decides=True,
                          upload=False)
    ids = [5, 9, 11]
    with torch.inference_mode():
        for _ in range(6):
            out, ref = collab.step(ids), alone.step(ids)
            assert out.token is None and ref.token is not None
            token, conf = heads.heads[4].top1(runner.tapped, runner.lm_head)
            assert (token, conf) == (ref.token, ref.confidence)
            ids = [token]


def _pull(address_holder: list):
    import zmq

    from cecollm.runtime import free_ports

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    sock.bind(address)
    address_holder.append(address)
    return sock


def _received(sock, count: int) -> list:
    from cecollm.wire import edge_cloud as ep

    out = []
    for _ in range(count):
        assert sock.poll(30_000), f"only {len(out)} of {count} messages arrived"
        out.append(ep.parse(sock.recv_multipart()))
    return out


def _flushes(sender) -> bool:
    """Whether flush() returns (run in a thread: a hang must fail the test, not stall it)."""
    import threading

    done = threading.Thread(target=sender.flush, daemon=True)
    done.start()
    done.join(30)
    return not done.is_alive()


def test_a_bad_segment_name_from_the_cloud_does_not_stop_the_sender():
    """WELCOME's segment name is peer input: one the edge cannot map sends the rows over the socket."""
    import numpy as np
    import zmq

    from cecollm.edge.sender import UploadSender
    from cecollm.wire import edge_cloud as ep

    where: list = []
    pull = _pull(where)
    sender = UploadSender(zmq.Context.instance(), where[0], send_timeout=5.0)
    try:
        sender.open(1, 7, "../../etc/passwd", 64, 0)  # not a name in /dev/shm
        sender.rows(0, np.ones((2, 8), np.float16))
        sender.end()
        assert _flushes(sender)
        upload, end = _received(pull, 2)
        assert isinstance(upload, ep.Upload) and upload.rows.shape == (2, 8) and isinstance(end, ep.End)
    finally:
        sender.close()
        pull.close(0)


def test_the_sender_lets_go_of_a_segment_when_its_session_ends():
    """A released segment stays in memory while anyone maps it: the edge unmaps at END."""
    import os
    from multiprocessing.shared_memory import SharedMemory

    import numpy as np
    import zmq

    from cecollm.edge.sender import UploadSender
    from cecollm.wire import edge_cloud as ep

    name = f"cecollm-test-sender-{os.getpid()}"
    seg = SharedMemory(name=name, create=True, size=4096)
    where: list = []
    pull = _pull(where)
    sender = UploadSender(zmq.Context.instance(), where[0], send_timeout=5.0)
    try:
        sender.open(1, 7, name, 64, 0)
        sender.rows(0, np.full((2, 8), 3, np.float16))
        sender.end()
        assert _flushes(sender)
        notice, _ = _received(pull, 2)
        assert isinstance(notice, ep.UploadShm) and notice.count == 2
        assert np.all(np.frombuffer(seg.buf[:32], np.float16) == 3)  # the rows are in the segment
        maps = open(f"/proc/{os.getpid()}/maps").read()
        assert maps.count(name) == 1, "only the owner maps the segment once its session ended"
    finally:
        sender.close()
        pull.close(0)
        seg.close()
        seg.unlink()


def test_a_device_id_out_of_range_is_a_usage_error():
    from click.testing import CliRunner

    from cecollm.edge.cli import edge_command

    out = CliRunner().invoke(edge_command, ["--device-id", "-1", "--prompt", "x"])
    assert out.exit_code == 2 and "device-id" in out.output and "Traceback" not in out.output
