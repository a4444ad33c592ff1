"""The bench's bookkeeping without a model: raw store, aggregation, goals, the report."""

from __future__ import annotations


import pytest

from cecollm.bench.config import BenchConfig
from cecollm.bench.report import RougeL, aggregate_dataset, check_goals, explain_bytes, explain_time
from cecollm.bench.store import RawStore
from cecollm.errors import UserError


def _rec(strategy, index, ids, total, edge=0.0, cloud=0.0, comm=0.0, up=0, requests=0, text=None):
    return {"dataset": "alpaca", "strategy": strategy, "index": index, "prompt_tokens": 10, "token_ids": ids,
            "text": text if text is not None else " ".join(f"w{i}" for i in ids), "decided_by": [],
            "total_s": total, "edge_s": edge, "cloud_s": cloud, "comm_s": comm, "cloud_requests": requests,
            "edge_tokens": len(ids) - requests, "fallback_tokens": 0, "wire_up": up, "wire_down": 10,
            "app_up": up, "app_down": 10, "problems": []}


def test_raw_store_resumes_and_survives_a_cut_line(tmp_path):
    store = RawStore(tmp_path / "run")
    store.check_settings({"model": "m", "max_new_tokens": 8})
    store.append(_rec("cloud", 0, [1, 2], 1.0))
    path = tmp_path / "run" / "raw" / "alpaca__cloud.jsonl"
    path.write_text(path.read_text() + '{"dataset": "alpaca", "strat')  # a crash mid-write
    assert set(store.load()) == {("alpaca", "cloud", 0)}
    store.append(_rec("cloud", 1, [3], 1.0))
    assert set(store.load()) == {("alpaca", "cloud", 0), ("alpaca", "cloud", 1)}
    store.check_settings({"model": "m", "max_new_tokens": 8})  # same settings: fine
    with pytest.raises(UserError, match="max_new_tokens: 8 then, 9 now"):
        store.check_settings({"model": "m", "max_new_tokens": 9})


def test_an_out_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(UserError, match="cannot write results into"):
        RawStore(tmp_path / "taken").check_settings({"model": "m"})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{cut")
    with pytest.raises(UserError, match="not JSON"):
        RawStore(tmp_path / "broken").check_settings({"model": "m"})


def test_aggregate_ratios_and_goals():
    records = {}
    for i in range(2):
        for r in (_rec("cloud", i, [1, 2, 3, 4], 10.0, cloud=9.5, comm=0.5, up=100),
                  _rec("naive", i, [1, 2, 3, 4], 40.0, edge=5, cloud=5, comm=30, up=100_000, requests=4),
                  _rec("ce-0.8", i, [1, 2, 3, 5], 8.0, edge=5, cloud=2, comm=1, up=800, requests=2),
                  _rec("ce-1.0-fp32", i, [1, 2, 3, 4], 12.0, edge=5, cloud=5, comm=2, up=1500, requests=4)):
            records[("alpaca", r["strategy"], i)] = r
    del records[("alpaca", "ce-0.8", 1)]  # not finished: prompt 1 is left out of every sum
    ds = aggregate_dataset("alpaca", [0, 1], ["cloud", "naive", "ce-0.8", "ce-1.0-fp32"], records, RougeL(), {})
    assert ds["prompts"] == [0]
    assert ds["strategies"]["cloud"]["wire_s"] is None  # records from before the link timed the wire
    s = ds["strategies"]
    assert s["ce-0.8"]["total_vs_cloud"] == pytest.approx(0.8)
    assert s["ce-0.8"]["cloud_vs_cloud"] == pytest.approx(2 / 9.5)
    assert s["ce-0.8"]["bytes_vs_naive"] == pytest.approx(810 / 100_010)
    assert s["ce-0.8"]["cloud_request_rate"] == 0.5 and s["cloud"]["cloud_request_rate"] is None
    assert s["ce-0.8"]["identical_to_cloud"] == 0.0 and 0.5 < s["ce-0.8"]["rouge_vs_cloud"] < 1.0
    assert s["ce-1.0-fp32"]["identical_to_cloud"] == 1.0 and s["ce-1.0-fp32"]["rouge_vs_cloud"] == 1.0
    goals = {g["goal"]: g for g in check_goals({"alpaca": ds}) if g["dataset"] == "alpaca"}
    assert goals["CE-CoLLM 0.8: total time vs cloud-based"]["status"] == "pass"
    assert goals["CE-CoLLM 0.8: total time vs cloud-based"]["margin"] == pytest.approx(0.8 - 0.85)
    assert goals["CE-CoLLM 0.8: cloud compute vs cloud-based"]["status"] == "pass"
    assert goals["CE-CoLLM 0.8: ROUGE-L vs cloud-based output"]["status"] == "miss"
    assert goals["ce-1.0-fp32: token-identical to cloud-based (fraction of prompts)"]["status"] == "pass"
    assert all(g["status"] == "not measured" for g in check_goals({"alpaca": ds}) if g["dataset"] == "xsum")
    assert "edge runs 26 of 30 layers" in explain_time(ds, {"n_layers": 30, "exits": [22, 26], "upload_layer": 26})
    text = explain_time(ds, {"n_layers": 30, "exits": [22, 26], "upload_layer": 26, "layer_params": 3,
                             "lm_head_params": 10})  # whole = 100: edge 0.78, a cloud request 0.22
    assert "0.78 + 0.22 x 0.50 = 0.89" in text
    assert "Bytes vs naive" in explain_bytes(ds)


def test_identical_texts_score_one_even_without_words():
    rouge = RougeL()
    assert rouge("...", "...") == 1.0
    assert rouge("the cat sat", "the cat sat") == 1.0
    assert rouge("the cat sat", "a dog ran") == 0.0


def test_truthfulqa_runs_only_the_accuracy_grid():
    config = BenchConfig(strategies=("cloud", "naive", "ce-0.8", "ce-0.8-nocm"))
    assert [s.name for s in config.strategies_for("truthfulqa")] == ["cloud", "ce-0.8"]
    assert [s.name for s in config.strategies_for("xsum")] == ["cloud", "naive", "ce-0.8", "ce-0.8-nocm"]


def test_data_files_are_read_or_refused_in_one_line(tmp_path):
    from cecollm.bench.data import read_prompts

    good = tmp_path / "alpaca.jsonl"
    good.write_text('{"instruction": "Say \u2028 hi", "input": "", "output": "hi"}\n\n{"instruction": "Go"}\n')
    prompts = read_prompts("alpaca", good)
    assert [(p.index, p.text) for p in prompts] == [(0, "Say \u2028 hi"), (2, "Go")]
    bad = tmp_path / "bad.jsonl"
    for content, message in ((b"", "holds no prompts"), (b"{cut\n", "not JSON"), (b"\xff\xfe\n", "UTF-8"),
                             (b'{"question": "q"}\n', "lacks a field")):
        bad.write_bytes(content)
        with pytest.raises(UserError, match=message):
            read_prompts("alpaca" if b"question" not in content else "truthfulqa", bad)
    with pytest.raises(UserError, match="no xsum file"):
        read_prompts("xsum", tmp_path / "missing.jsonl")
