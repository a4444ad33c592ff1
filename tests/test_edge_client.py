"""The edge client's pieces that need no cloud: prompts, addresses, the tapped last exit."""

from __future__ import annotations

import pytest
import torch

from cecollm.edge.cli import read_prompts
from cecollm.edge.client import EdgeConfig, _TappingRunner
from cecollm.edge.heads import HeadSet
from cecollm.edge.partition import EdgePartition
from cecollm.errors import UserError
from cecollm.split import Split
from conftest import make_tiny_model


def test_prompts_from_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"instruction": "b", "input": "c"}\n{"instruction": "d", "input": ""}\n')
    assert read_prompts(None, str(path)) == ["a", "b\n\nc", "d"]
    assert read_prompts("x", str(path)) == ["x"]
    path.write_text('{"text": "a"}\n')
    with pytest.raises(UserError, match=":1: needs"):
        read_prompts(None, str(path))
    path.write_text("not json\n")
    with pytest.raises(UserError, match="not JSON"):
        read_prompts(None, str(path))
    with pytest.raises(UserError, match="cannot read"):
        read_prompts(None, str(tmp_path / "missing.jsonl"))


def test_upload_address_and_shm_follow_the_broker_address():
    assert EdgeConfig(broker="tcp://host:7000").upload_address == "tcp://host:7001"
    assert EdgeConfig(broker="tcp://host:7000", upload="tcp://other:1").upload_address == "tcp://other:1"
    ipc = EdgeConfig(broker="ipc:///tmp/x.requests")
    assert ipc.upload_address == "ipc:///tmp/x.uploads" and ipc.use_shm
    assert not EdgeConfig(broker="tcp://h:1").use_shm and EdgeConfig(broker="tcp://h:1", shm=True).use_shm
    with pytest.raises(ValueError):
        EdgeConfig(broker="ipc:///tmp/x").upload_address


def test_the_tapped_row_gives_the_standalone_token():
    """When no exit decides, the last exit's head on the tapped row is what standalone would pick."""
    torch.manual_seed(0)
    model = make_tiny_model("mha")
    split = Split.create(model.config.num_hidden_layers, (2, 4))
    heads = HeadSet.lens(model, split.exits)
    runner = _TappingRunner(model, split.last_exit)
    collab = EdgePartition(runner, split, heads, threshold=1.0)
    alone = EdgePartition(_TappingRunner(model, split.last_exit), split, heads, threshold=1.0, standalone=True)
    ids = [5, 9, 11]
    with torch.inference_mode():
        for _ in range(6):
            out, ref = collab.step(ids), alone.step(ids)
            assert out.token is None and ref.token is not None
            token, conf = heads.heads[4].top1(runner.tapped, runner.lm_head)
            assert (token, conf) == (ref.token, ref.confidence)
            ids = [token]
