"""`cecollm bench` end to end on a tiny model: every strategy, the files, the exactness and byte checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cecollm.bench.config import ACCURACY, STRATEGIES

ALPACA = [{"instruction": "Tell me a story about a cat.", "input": "", "output": "The cat and the dog."},
          {"instruction": "The capital of France is", "input": "Paris", "output": "Paris."}]
XSUM = [{"id": "1", "document": "Edge devices run the first layers; the cloud runs the rest. " * 4,
         "summary": "Edge and cloud run the layers."},
        {"id": "2", "document": "Tell me a story about a cat and a dog. The capital of France is Paris. " * 3,
         "summary": "A cat, a dog and Paris."}]
TRUTHFULQA = [{"question": "What is the capital of France?", "answer": ["Paris", "The capital of France is Paris"]},
              {"question": "What runs the rest?", "answer": ["The cloud runs the rest"]}]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _bench(*args, timeout=150):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "cecollm", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One full run on a tiny model (module scope: the tests below share it)."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    tmp_path = tmp_path_factory.mktemp("bench")
    model = make_tiny_model("gqa", eos=2)
    tiny_model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(tiny_model_dir)
    make_tiny_tokenizer(model.config.vocab_size).save_pretrained(tiny_model_dir)
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "alpaca.jsonl", ALPACA)
    _write(data / "xsum.jsonl", XSUM)
    _write(data / "truthfulqa.jsonl", TRUTHFULQA)
    out = tmp_path / "results" / "tiny"
    args = ["--model", str(tiny_model_dir), "--n", "2", "--max-new-tokens", "8", "--link", "lan",
            "--data-dir", str(data), "--out", str(out), "--scaling", "1,2", "--quiet", "--timeout", "30"]
    proc = _bench(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, args, proc


def test_bench_end_to_end(bench_run):
    out, args, proc = bench_run
    for name in ("results.json", "report.md", "run.json", "time_breakdown.png", "scaling.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    speed = {d: results["datasets"][d]["strategies"] for d in ("alpaca", "xsum")}
    for dataset, strategies in speed.items():
        assert set(strategies) == {s.name for s in STRATEGIES}, dataset
        assert results["datasets"][dataset]["prompts"] == [0, 1]
        # threshold 1.0 with float32 on the wire is the cloud-based output, token for token
        assert strategies["ce-1.0-fp32"]["identical_to_cloud"] == 1.0
        assert strategies["ce-1.0-fp32"]["rouge_vs_cloud"] == 1.0
        assert strategies["naive"]["identical_to_cloud"] == 1.0
        # the naive baseline sends every position's states every token; CE-CoLLM each row once
        assert strategies["naive"]["wire_up"] > 5 * strategies["ce-0.8"]["wire_up"]
        assert strategies["naive"]["cloud_request_rate"] == 1.0
        # float16 halves the rows (plus small fixed message costs)
        assert strategies["ce-1.0"]["wire_up"] < 0.75 * strategies["ce-1.0-fp32"]["wire_up"]
        # the cloud-based deployment sends token ids, not hidden states
        assert strategies["cloud"]["wire_up"] < strategies["ce-1.0"]["wire_up"]
        standalone = strategies["standalone"]
        assert standalone["wire_up"] == 0 and standalone["cloud_s"] == 0 and standalone["cloud_requests"] == 0
        assert standalone["wire_s"] == 0.0
        # time on the wire (lan: 0.5 ms each way): at least one latency up and one down per request
        assert strategies["cloud"]["wire_s"] >= 0.9 * 2 * 0.0005 * 2
        for name in ("naive", "ce-0.8", "ce-1.0-fp32", "ce-0.8-nocm"):
            assert strategies[name]["wire_s"] >= 0.9 * 2 * 0.0005 * strategies[name]["cloud_requests"], name
        for name, agg in strategies.items():  # a union over both directions: never more than the wall time
            assert agg["wire_s"] <= agg["total_s"] + 0.01 * len(results["datasets"][dataset]["prompts"]), name
        for name, agg in strategies.items():
            assert agg["tokens"] > 0 and agg["total_s"] > 0, name
            assert not agg["problems"], (name, agg["problems"])
            if name not in ("cloud", "standalone"):
                assert agg["edge_s"] > 0 and agg["cloud_s"] > 0 and agg["comm_s"] > 0, name
    assert set(results["datasets"]["truthfulqa"]["strategies"]) == set(ACCURACY)
    assert set(results["accuracy"]) == set(ACCURACY)
    for name, acc in results["accuracy"].items():
        assert 0.0 <= acc["xsum"] <= 1.0 and 0.0 <= acc["truthfulqa"] <= 1.0, name
    goals = {(g["dataset"], g["goal"]): g for g in results["goals"]}
    assert goals[("alpaca", "ce-1.0-fp32: token-identical to cloud-based (fraction of prompts)")]["status"] == "pass"
    for dataset in ("alpaca", "xsum"):  # the exact mode's output is the full model's at threshold 0.8
        assert goals[(dataset, "exact-fp32: token-identical to cloud-based (fraction of prompts)")]["status"] == "pass"
        exact = results["datasets"][dataset]["strategies"]["exact-fp32"]
        assert exact["drafts"] >= exact["tokens"] and exact["verifies"] > 0
    assert all(g["status"] in ("pass", "miss") for g in results["goals"])
    scaling = results["scaling"]
    kinds = ("ce-0.8", "cloud")
    assert scaling["status"] == "complete", scaling["status"]
    assert {(r["dataset"], r["kind"], r["devices"]) for r in scaling["rows"]} == {
        (d, k, n) for d in ("alpaca", "xsum") for k in kinds for n in (1, 2)}
    assert all(not r.get("errors") and not r.get("error") for r in scaling["rows"])
    report = (out / "report.md").read_text()
    for heading in ("Speed (the paper's Table 2)", "Ablation at threshold 0.8", "What each removal shows",
                    "Exact collaboration: where the time goes",
                    "Accuracy", "Goal check", "Scaling"):
        assert heading in report
    raw = list((out / "raw").glob("*__*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in raw) == 2 * 2 * len(STRATEGIES) + 2 * len(ACCURACY)


def test_bench_resumes_and_refuses_other_settings(bench_run):
    out, args, _ = bench_run
    lines = {p.name: p.read_text() for p in (out / "raw").glob("*.jsonl")}
    again = _bench(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run, 0 scaling points to run" in again.stderr
    assert {p.name: p.read_text() for p in (out / "raw").glob("*.jsonl")} == lines
    # a cut line (a crash mid-write) is skipped and that prompt runs again
    victim = out / "raw" / "alpaca__naive.jsonl"
    first, second = victim.read_text().splitlines()
    victim.write_text(first + "\n" + second[:40])
    third = _bench(*args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "1 to run" in third.stderr
    assert len(victim.read_text().splitlines()) == 3  # the cut line, then the prompt again
    changed = _bench(*[a if a != "8" else "9" for a in args])
    assert changed.returncode == 2 and "other settings" in changed.stderr
    # the same settings on another data file: prompt 0 is another prompt now, not a result to keep
    other = out.parent / "other-alpaca.jsonl"
    _write(other, [{**ALPACA[0], "instruction": "Tell me a story about a dog."}, ALPACA[1]])
    swapped = _bench(*args, "--data", f"alpaca={other}")
    assert swapped.returncode == 2 and "another prompt text" in swapped.stderr, swapped.stderr[-2000:]
    assert "Traceback" not in swapped.stderr


def test_bench_report_only_rewrites_the_same_report_from_results_json(bench_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from cecollm.cli import cli

    out, _, _ = bench_run
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "results.json", copy / "results.json")  # no raw/, no report, no plots
    result = CliRunner().invoke(cli, ["bench", "--report-only", "--out", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    assert (copy / "time_breakdown.png").is_file() and (copy / "scaling.png").is_file()
    assert not (copy / "raw").exists()
    results = json.loads((out / "results.json").read_text())
    del results["meta"]["settings"]["model"]
    nan = (out / "results.json").read_text().replace('"total_s": ', '"total_s": NaN, "x": ', 1)
    cases = ((None, "no results.json"), ("{cut", "cannot read"), ("[]", "not a results.json"),
             ('{"meta": {}, "datasets": {}, "accuracy": {}, "goals": [], "scaling": {}}', "not a results.json"),
             (json.dumps(results), "lacks 'model'"), (nan, "NaN is not a number"))
    for number, (content, message) in enumerate(cases):
        bad = tmp_path / f"bad{number}"
        bad.mkdir()
        if content is not None:
            (bad / "results.json").write_text(content)
        result = CliRunner().invoke(cli, ["bench", "--report-only", "--out", str(bad)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["bench", "--report-only", "--out", str(copy), "--n", "3"])
    assert result.exit_code == 2 and "drop --n" in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["--strategies", "fast"], "unknown strategy"), (["--datasets", "cnn"], "unknown dataset"),
    (["--n", "0"], "--n must be"), (["--data", "xsum"], "NAME=PATH"), (["--scaling", "a,b"], "--scaling"),
    (["--timeout", "0"], "--timeout must be"),
    (["--data-dir", "/nonexistent", "--model", "/nonexistent-model"], ""),
])
def test_bench_user_errors(tmp_path, args, message):
    from click.testing import CliRunner

    from cecollm.cli import cli

    result = CliRunner().invoke(cli, ["bench", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
