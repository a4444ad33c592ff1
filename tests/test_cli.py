"""`cecollm generate`: JSON output, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel

from cecollm.cli import cli


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_generate_json(tiny_model_dir):
    res = run(["generate", "--model", str(tiny_model_dir), "--prompt", "The cat", "--exits", "2,4",
               "--max-new-tokens", "6", "--threshold", "1.0", "--json", "--no-fp16"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"token_ids", "text", "tokens", "stats"}
    assert 1 <= len(out["token_ids"]) <= 6
    assert [t["token_id"] for t in out["tokens"]] == out["token_ids"]
    assert all(t["decided_by"] == "cloud" for t in out["tokens"])
    positions = [t["position"] for t in out["tokens"]]
    assert positions == list(range(positions[0], positions[0] + len(positions)))
    stats = out["stats"]
    assert stats["cloud_tokens"] == len(out["token_ids"]) and stats["edge_tokens"] == 0
    assert stats["bytes_up"] > 0 and stats["cloud_seconds"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generate_in_a_dtype_is_transformers_in_that_dtype(tiny_model_dir, dtype):
    """--dtype loads the model in that dtype: cloud-only and the split (2-byte uploads in the model's own
    dtype) both give transformers' greedy tokens of the same model in the same dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import hf_greedy

    outs = {}
    for mode in ("cloud", "collab"):
        res = run(["generate", "--model", str(tiny_model_dir), "--prompt", "The cat", "--exits", "2,4", "--raw",
                   "--max-new-tokens", "8", "--threshold", "1.0", "--mode", mode, "--dtype", dtype, "--json"])
        assert res.exit_code == 0, res.output
        outs[mode] = json.loads(res.stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype)).eval()
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir)("The cat")["input_ids"]
    expected = hf_greedy(model, prompt, 8)  # up to EOS (id 2), where generate stops too
    expected = expected[:expected.index(2) + 1] if 2 in expected else expected
    assert outs["cloud"]["token_ids"] == outs["collab"]["token_ids"] == expected
    # The tokens of a tiny model may not tell dtypes apart; their probabilities do.
    confidences = [t["confidence"] for t in outs["cloud"]["tokens"]]
    assert confidences == pytest.approx(_hf_confidences(model, prompt, len(expected)), rel=1e-5)
    assert confidences != pytest.approx(_hf_confidences(model.float(), prompt, len(expected)), rel=1e-5)
    rows = outs["collab"]["stats"]["prompt_tokens"] + len(outs["collab"]["token_ids"]) - 1
    assert outs["collab"]["stats"]["bytes_up"] == rows * model.config.hidden_size * 2


def _hf_confidences(model, prompt, n):
    """The probability of each token transformers' greedy generation picks."""
    import torch

    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, output_scores=True, return_dict_in_generate=True)
    return [float(torch.softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, out.sequences[0, len(prompt):])]


def test_generate_standalone_text(tiny_model_dir):
    res = run(["generate", "--model", str(tiny_model_dir), "--prompt", "hello", "--mode", "standalone",
               "--exits", "3", "--max-new-tokens", "4", "--raw"])
    assert res.exit_code == 0, res.output
    assert "0 cloud" in res.stderr


@pytest.fixture
def gpt2_dir(tmp_path):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(path)
    return path


BAD_INPUTS = {
    "missing model": (["--model", "/nonexistent/model"], "model not found"),
    "exit beyond layers": (["--exits", "2,8"], "out of range"),
    "exits out of order": (["--exits", "4,2"], "strictly increasing"),
    "exits not numbers": (["--exits", "a,b"], "--exits"),
    "threshold above 1": (["--threshold", "1.5"], "threshold"),
    "threshold below 0": (["--threshold", "-0.2"], "threshold"),
    "empty prompt": (["--prompt", "  "], "prompt is empty"),
    "zero tokens": (["--max-new-tokens", "0"], "max-new-tokens"),
    "bad heads file": (["--heads", "/nonexistent/heads.safetensors"], "heads file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(tiny_model_dir, case):
    extra, message = BAD_INPUTS[case]
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "2"]
    res = run(args + extra)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_threads_below_one_is_refused(tiny_model_dir):
    """--threads -1 reached torch.set_num_threads and ended in a RuntimeError traceback."""
    res = run(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--threads", "-1"])
    assert res.exit_code == 2 and "--threads" in res.stderr and "Traceback" not in res.output, res.output


def test_set_threads_raises_user_error():
    from cecollm.cliutil import set_threads
    from cecollm.errors import UserError

    with pytest.raises(UserError, match="--threads must be at least 1"):
        set_threads(0)


def test_unsupported_architecture(gpt2_dir):
    res = run(["generate", "--model", str(gpt2_dir), "--prompt", "hi"])
    assert res.exit_code == 2
    assert "GPT2LMHeadModel is not supported; supported: LlamaForCausalLM" in res.stderr


def test_real_process_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it: one line on stderr, exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "cecollm", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model not found: {tmp_path / 'nope'} (a directory, a .gguf file, or SmolLM2-135M-Instruct)"


def test_a_bad_dtype_is_refused_by_the_option():
    res = CliRunner().invoke(cli, ["generate", "--model", "m", "--prompt", "hi", "--dtype", "float64"])
    assert res.exit_code == 2 and "'float64' is not one of 'float32', 'bfloat16', 'float16'" in res.output


def test_help_explains():
    res = run(["generate", "--help"])
    assert res.exit_code == 0
    for word in ("--threshold", "--exits", "--mode", "standalone", "--no-fp16", "--heads"):
        assert word in res.output
