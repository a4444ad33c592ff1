"""The bench's bookkeeping without a model: raw store, aggregation, goals, the report."""

from __future__ import annotations

import pytest

from cecollm.bench.config import BenchConfig
from cecollm.bench.explain import explain_ablations, explain_bytes, explain_scaling, explain_time
from cecollm.bench.report import RougeL, aggregate_dataset, check_goals
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
    assert "Measured" not in text  # a pass needs no budget
    assert "Bytes vs naive" in explain_bytes(ds)


def _agg(total, edge, cloud, comm, wire, requests, tokens=100, **extra):
    return {"total_s": total, "edge_s": edge, "cloud_s": cloud, "comm_s": comm, "wire_bytes": wire,
            "cloud_requests": requests, "tokens": tokens, "edge_tokens": tokens - requests,
            "cloud_request_rate": requests / tokens, "prompt_tokens": 50, **extra}


def test_a_missed_time_goal_gets_the_request_budget():
    ds = {"prompts": [0], "strategies": {"cloud": _agg(10.0, 0, 9.8, 0.2, 100, 0),
                                         "ce-0.8": _agg(12.0, 7.0, 2.0, 3.0, 1000, 50)}}
    text = explain_time(ds, None)
    # 0.85 x 10 s = 8.5 s; the edge's part (12 - 2 - 3 = 7 s) leaves 1.5 s; a request costs 5 s / 50 = 100 ms
    assert "is 0.70 of cloud-based" in text and "100.0 ms" in text and "about 15 requests in 100 tokens" in text
    ds["strategies"]["ce-0.8"] = _agg(12.0, 9.0, 1.0, 1.0, 1000, 50)
    assert "already over 0.85: no request rate closes it" in explain_time(ds, None)


def test_ablations_name_the_moved_terms_and_the_verdict():
    s = {"ce-0.8": _agg(100.0, 60.0, 20.0, 20.0, 1_000_000, 60),
         "ce-0.8-fp32": _agg(101.0, 61.0, 20.0, 20.0, 2_000_000, 60),  # same work: a 1% edge wobble
         "ce-1.0": _agg(120.0, 60.0, 33.0, 27.0, 1_000_000, 100),
         "ce-0.8-nocm": _agg(150.0, 60.0, 60.0, 30.0, 30_000_000, 60),
         "naive": _agg(300.0, 60.0, 140.0, 100.0, 100_000_000, 100, total_vs_cloud=2.5)}
    lines = explain_ablations({"prompts": [0], "strategies": s}, up_mbit=100.0)
    assert len(lines) == 4
    fp32, no_exit, no_cm, naive = lines
    assert "total 101%" in fp32 and "no clear difference" in fp32
    assert "at most 0.08 s" in fp32  # 1 MB at 100 Mbit/s
    assert "edge's compute differs by +1.00 s" in fp32
    assert "total 120%" in no_exit and "the paper's direction" in no_exit and "40 more requests" in no_exit
    assert "500.0 ms" in no_exit  # (13 s more cloud + 7 s more communication) / 40 requests
    assert "x30.0 bytes" in no_cm and "cloud compute x3.0" in no_cm
    assert "2.50 of cloud-based" in naive and "x100.0 bytes" in naive
    assert "(40 tokens the exits decided at 0.8, +0 from answers of another length)" in no_exit
    # the same edge work 5 s (8.3%) apart: a 5% slower total is within that noise, not a finding
    s["ce-0.8-fp32"] = _agg(105.0, 65.0, 20.0, 20.0, 2_000_000, 60)
    fp32 = explain_ablations({"prompts": [0], "strategies": s}, None)[0]
    assert "no clear difference (within 8.3%, the noise measured on the same edge work)" in fp32
    assert "slower" in explain_ablations({"prompts": [0], "strategies": s}, None)[1]  # 120% is beyond it
    s["ce-0.8-fp32"] = _agg(90.0, 50.0, 20.0, 20.0, 2_000_000, 60, tokens=101)  # other work: no noise measured
    assert "not the paper's direction" in explain_ablations({"prompts": [0], "strategies": s}, None)[0]
    assert explain_ablations({"prompts": [0], "strategies": {"naive": s["naive"]}}, None) == []


def test_scaling_compares_the_largest_common_device_count():
    rows = [{"dataset": "alpaca", "kind": kind, "devices": k, "wall_seconds": wall, "latency_p99_ms": 50.0 * k}
            for kind, walls in (("ce-0.8", (10.0, 12.0, 30.0)), ("cloud", (8.0, 16.0))) for k, wall in
            zip((1, 2, 3), walls)]
    rows.append({"dataset": "alpaca", "kind": "cloud", "devices": 3, "error": "boom"})
    (line,) = explain_scaling({"rows": rows})
    assert "at 2 devices" in line and "(0.75); at 1: 1.25." in line
    assert "cloud-based grew x2.00" in line and "CE-CoLLM grew x1.20" in line and "from 50 to 100 ms" in line
    rows[1]["latency_p99_ms"] = None
    (line,) = explain_scaling({"rows": rows})
    assert line.endswith("the cloud only the requests.") and "p99" not in line
    rows[3]["errors"] = 1  # cloud-based at 1 device lost a device: left out, as is cloud-based at 3 (failed)
    (line,) = explain_scaling({"rows": rows})
    assert line.startswith("alpaca: at 2 devices") and "(0.75)." in line and "grew" not in line
    assert explain_scaling({"rows": []}) == []


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
