"""Training early-exit heads (issue 4) on tiny random models: the loss falls, runs are
deterministic and resumable, heads files round-trip, and bad inputs get one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cecollm.cli import cli
from cecollm.edge.heads import HeadSet
from cecollm.exits.collect import CacheSpec, collect
from cecollm.exits.config import TrainConfig
from cecollm.exits.data import read_examples
from cecollm.exits.train import ExitTrainer
from cecollm.loading import model_identity
from cecollm.split import Split

from conftest import make_tiny_model

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat and looked at the dog",
             "colors: red, blue and yellow are primary", "one two three four five six seven eight"]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(SENTENCES * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two tiny models (gqa, different seeds) saved with a tokenizer, and a small Alpaca file."""
    root = tmp_path_factory.mktemp("exits")
    tok = make_tokenizer()
    dirs = []
    for seed in (0, 1):
        model = make_tiny_model("gqa", seed=seed, eos=tok.eos_token_id)
        d = root / f"model{seed}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    data = root / "alpaca.jsonl"
    records = [{"instruction": f"{SENTENCES[i % 4]} {i}", "input": "", "output": SENTENCES[(i + 1) % 4] * 2}
               for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return dirs[0], dirs[1], data


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CECOLLM_HOME", str(tmp_path / "home"))
    torch.set_num_threads(1)


def _cache(model_dir, data, tmp_path, layers=(2, 4)):
    from cecollm.loading import load_model

    loaded = load_model(str(model_dir))
    examples = read_examples([data], "train", holdout=10)
    spec = CacheSpec(loaded.identity, (data.name,), 10, "train", 128, 16, 0)
    return loaded, collect(loaded.model, loaded.tokenizer, examples, layers, spec, tmp_path / "cache")


def test_a_cache_without_the_asked_layers_is_a_user_error(tiny_dirs, tmp_path):
    """exits-compare loads a cache at its --exits: a layer the cache lacks was a KeyError traceback."""
    from cecollm.errors import UserError
    from cecollm.exits.collect import load_cache

    _cache(tiny_dirs[0], tiny_dirs[2], tmp_path, layers=(2, 4))
    with pytest.raises(UserError, match=r"holds layers \[2, 4\], not all of \[2, 5\]"):
        load_cache(tmp_path / "cache", (2, 5))
    assert load_cache(tmp_path / "cache", (4,)).layers == (4,)


def test_compare_checks_every_candidate_before_training(tiny_dirs, tmp_path, monkeypatch):
    """A bad last candidate failed only after the earlier ones had trained; none at all was an IndexError."""
    from cecollm.errors import UserError
    from cecollm.exits import compare

    loaded, cache = _cache(tiny_dirs[0], tiny_dirs[2], tmp_path)
    monkeypatch.setattr(compare, "ExitTrainer", lambda *a, **k: pytest.fail("trained before checking"))
    for candidates, message in [(["norm", "adapter:x"], "unknown candidate 'adapter:x'"), ([], "no candidates")]:
        with pytest.raises(UserError, match=message):
            compare.compare(loaded.model, (2, 4), cache, cache, candidates, TrainConfig())


def test_reduced_vocabulary_holds_only_ids_of_the_model():
    """choose_vocab padded its counts to max seen id + 1 + size, so a reduced vocabulary close to
    the model's took ids beyond it (an IndexError in the LM head)."""
    from cecollm.exits.collect import ExitCache
    from cecollm.exits.train import choose_vocab

    top_idx = torch.tensor([[600], [5], [600]])
    cache = ExitCache((2,), {}, top_idx, torch.ones(3, 1), torch.tensor([0, 3]), torch.ones(3, dtype=torch.bool),
                      torch.ones(3, dtype=torch.bool))
    tokens = choose_vocab(cache, 639, 640)
    assert tokens[:2].tolist() == [600, 5] and len(set(tokens.tolist())) == 639 and int(tokens.max()) < 640
    assert choose_vocab(cache, 4, 640).tolist() == [600, 5, 0, 1]


def test_holdout_records_are_never_trained(tiny_dirs):
    _, _, data = tiny_dirs
    train = read_examples([data], "train", holdout=10)
    held = read_examples([data], "heldout", holdout=10)
    assert [e.source for e in held] == [f"alpaca.jsonl:{i}" for i in range(30, 40)]
    assert not {e.source for e in train} & {e.source for e in held}


@pytest.mark.parametrize("arch, options, greedy", [("norm", {}, 0.0), ("adapter", {"rank": 8, "vocab": 0}, 0.0),
                                                   ("adapter", {"rank": 8, "vocab": 64}, 1.0), ("layer", {}, 0.5)])
def test_training_makes_the_loss_fall(tiny_dirs, tmp_path, arch, options, greedy):
    loaded, cache = _cache(tiny_dirs[0], tiny_dirs[2], tmp_path)
    config = TrainConfig(arch=arch, arch_options=options, epochs=4, batch_rows=64, greedy_weight=greedy)
    trainer = ExitTrainer(loaded.model, (2, 4), cache, config)
    summary = trainer.train(progress=False)
    first = sum(trainer.losses[:3]) / 3
    last = sum(trainer.losses[-3:]) / 3
    assert last < 0.8 * first, (arch, options, first, last)
    assert summary["complete"] and summary["steps"] == trainer.total_steps


def test_seed_makes_training_deterministic_and_resume_matches(tiny_dirs, tmp_path):
    loaded, cache = _cache(tiny_dirs[0], tiny_dirs[2], tmp_path)
    config = TrainConfig(arch="adapter", arch_options={"rank": 8, "vocab": 0}, epochs=2, batch_rows=64, seed=3)
    whole = ExitTrainer(loaded.model, (2, 4), cache, config)
    whole.train(progress=False)
    ckpt = tmp_path / "h.ckpt"
    first = ExitTrainer(loaded.model, (2, 4), cache, config, checkpoint=ckpt)
    first.train(progress=False, stop_at=whole.total_steps // 2 + 1)  # interrupted part-way
    second = ExitTrainer(loaded.model, (2, 4), cache, config, checkpoint=ckpt)
    assert second.resume() and second.step == whole.total_steps // 2 + 1
    second.train(progress=False)
    for e in (2, 4):
        for (name, a), b in zip(whole.heads[e].state_dict().items(), second.heads[e].state_dict().values()):
            assert torch.equal(a, b), (e, name)
    other = ExitTrainer(loaded.model, (2, 4), cache, TrainConfig(arch="adapter", arch_options={"rank": 8, "vocab": 0},
                                                                 epochs=2, batch_rows=64, seed=4))
    other.train(progress=False)
    assert not torch.equal(other.heads[2].down.weight, whole.heads[2].down.weight)


def test_a_foreign_checkpoint_is_a_user_error(tiny_dirs, tmp_path):
    from cecollm.errors import UserError

    loaded, cache = _cache(tiny_dirs[0], tiny_dirs[2], tmp_path)
    config = TrainConfig(arch="norm", epochs=1, batch_rows=64)
    ckpt = tmp_path / "h.ckpt"
    ExitTrainer(loaded.model, (2, 4), cache, config, checkpoint=ckpt).train(progress=False, stop_at=1)
    other = ExitTrainer(loaded.model, (2, 4), cache, TrainConfig(arch="norm", epochs=1, batch_rows=64, seed=9),
                        checkpoint=ckpt)
    with pytest.raises(UserError, match="other settings; remove it or pass --fresh"):
        other.resume()
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a train-exits checkpoint"):
        other.resume()


@pytest.mark.parametrize("arch, options", [("adapter", {"rank": 8, "vocab": 64}), ("norm", {}), ("layer", {})])
def test_heads_file_round_trips(tiny_dirs, tmp_path, arch, options):
    loaded, cache = _cache(tiny_dirs[0], tiny_dirs[2], tmp_path)
    trainer = ExitTrainer(loaded.model, (2, 4), cache, TrainConfig(arch=arch, arch_options=options, epochs=1, batch_rows=64))
    trainer.train(progress=False)
    heads = HeadSet((2, 4), trainer.heads, arch, options, loaded.identity, {"note": "test"})
    path = tmp_path / "heads.safetensors"
    heads.save(path)
    back = HeadSet.load(path, loaded.model, loaded.identity)
    assert back.exits == (2, 4) and back.arch == arch and back.arch_options == options
    assert back.training == {"note": "test"}
    hidden = torch.randn(1, 5, loaded.model.config.hidden_size)
    with torch.no_grad():
        for e in (2, 4):
            assert torch.equal(trainer.heads[e].eval()(hidden, loaded.model.lm_head), back.heads[e](hidden, loaded.model.lm_head))
            if arch != "layer":
                last = hidden[:, -1:]
                assert trainer.heads[e].top1(last, loaded.model.lm_head) == back.heads[e].top1(last, loaded.model.lm_head)


@pytest.mark.parametrize("key, value", [("arch_options", "{not json"), ("training", "[1]"), ("arch_options", "3"),
                                        ("exits", "x")])
def test_damaged_heads_metadata_is_a_user_error(tmp_path, key, value):
    """Damaged arch_options or training metadata raised a JSONDecodeError / TypeError traceback."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cecollm.errors import UserError

    model = make_tiny_model("gqa")
    path = tmp_path / "heads.safetensors"
    HeadSet.lens(model, (2, 4)).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    save_file(tensors, str(path), metadata={**meta, key: value})
    with pytest.raises(UserError, match="metadata is damaged"):
        HeadSet.load(path, model, "")


def test_report_checks_the_reference_output_against_the_full_model(monkeypatch):
    """Agreement at threshold 1.0 was taken as 1 without a check, though float16 upload can flip
    a token: with a full model that disagrees everywhere, every threshold's agreement is 0."""
    from cecollm.exits import report
    from cecollm.loading import LoadedModel

    from conftest import make_tiny_tokenizer

    model = make_tiny_model("gqa")
    loaded = LoadedModel(model, make_tiny_tokenizer(model.config.vocab_size), None, "tiny")
    calls = []

    def disagreeing(model, prompt_ids, token_ids):
        calls.append(len(token_ids))
        return [-1] * len(token_ids)

    monkeypatch.setattr(report, "_full_model_choices", disagreeing)
    heads = HeadSet.lens(model, (2, 4))
    out = report.run_report(loaded, Split.create(8, (2, 4)), heads, [("p:0", "The cat")], 4, (0.5, 1.0))
    assert calls, "the reference output was never checked against the full model"
    assert [r["agreement"] for r in out["rows"]] == [0.0, 0.0]
    assert out["rows"][-1]["match_t1"] == 1.0


def test_selfgen_refuses_to_append_to_a_foreign_file(tiny_dirs, tmp_path):
    """An --out file that is not exits-selfgen output was a JSONDecodeError / KeyError traceback."""
    model0, _, data = tiny_dirs
    for content in ("plain text\n", '{"prompt": "x"}\n'):
        out = tmp_path / "answers.jsonl"
        out.write_text(content)
        code, text = _invoke("exits-selfgen", "--model", model0, "--data", data, "--out", out, "--n", 1)
        assert code == 2 and text.startswith("error:") and "not an exits-selfgen record" in text, text
        assert out.read_text() == content


def _invoke(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    return result.exit_code, result.output


def test_cli_trains_reports_and_rejects_bad_inputs(tiny_dirs, tmp_path):
    model0, model1, data = tiny_dirs
    out = tmp_path / "h.safetensors"
    code, text = _invoke("train-exits", "--model", model0, "--exits", "2,4", "--data", data, "--out", out,
                         "--holdout", 10, "--epochs", 2, "--batch-rows", 64, "--rank", 8, "--vocab", 64, "--seed", 1)
    assert code == 0, text
    assert "loss" in text and out.is_file() and not (tmp_path / "h.safetensors.ckpt").exists()
    meta = HeadSet.load(out, *_model_and_identity(model0)).training
    assert meta["config"]["seed"] == 1 and meta["data"]["held_out"].startswith("the last 10")
    assert meta["summary"]["final_loss"] < meta["summary"]["first_loss"]

    code, text = _invoke("exits-report", "--model", model0, "--heads", out, "--prompts", data, "--holdout", 10,
                         "--n", 2, "--max-new-tokens", 4, "--thresholds", "0.5,1.0", "--out", tmp_path / "rep")
    assert code == 0, text
    report = json.loads((tmp_path / "rep" / "exits-report.json").read_text())
    top = report["rows"][-1]
    assert top["threshold"] == 1.0 and top["edge_share"] == 0 and top["rouge_l"] == 1.0 and top["agreement"] == 1.0
    assert (tmp_path / "rep" / "exits-report.png").stat().st_size > 1000

    for args, message in [
        (["train-exits", "--model", model0, "--exits", "2,4", "--data", tmp_path / "nope.jsonl", "--out", out],
         "data file not found"),
        (["train-exits", "--model", model0, "--exits", "2,9", "--data", data, "--out", out], "out of range"),
        (["generate", "--model", model1, "--heads", out, "--prompt", "hi"], "another model"),
        (["exits-report", "--model", model1, "--heads", out, "--prompts", data], "another model"),
        (["generate", "--model", model0, "--heads", out, "--exits", "2,5", "--prompt", "hi"], "differ"),
    ]:
        code, text = _invoke(*args)
        assert code == 2, (args, text)
        assert text.strip().count("\n") == 0 and text.startswith("error:") and message in text, text


@pytest.mark.parametrize("option, value", [("--batch-rows", 0), ("--top-k", 0), ("--max-len", 0), ("--epochs", 0),
                                           ("--vocab", -1), ("--rank", -1), ("--threads", 0), ("--holdout", -1)])
def test_train_exits_rejects_numbers_out_of_range(tiny_dirs, tmp_path, option, value):
    """Each of these used to crash later with a traceback (ZeroDivisionError, IndexError) or, for
    --epochs 0, silently train one step."""
    model0, _, data = tiny_dirs
    code, text = _invoke("train-exits", "--model", model0, "--exits", "2,4", "--data", data,
                         "--out", tmp_path / "h.safetensors", option, value)
    assert code == 2 and "Traceback" not in text and option in text and "range" in text, text
    assert not (tmp_path / "h.safetensors").exists()


@pytest.mark.parametrize("line", ["5", "[1, 2]", '"text"', "null"])
def test_jsonl_records_that_are_not_objects_are_one_line_errors(tiny_dirs, tmp_path, line):
    model0, _, data = tiny_dirs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n' + line + "\n")
    for args in (["train-exits", "--exits", "2,4", "--data", bad, "--out", tmp_path / "h.safetensors"],
                 ["exits-report", "--prompts", bad, "--part", "all"]):
        code, text = _invoke(*args, "--model", model0)
        assert code == 2 and text.startswith("error:") and text.strip().count("\n") == 0, text
        assert f"{bad}:2: a record is a JSON object" in text, text


def test_exits_report_rejects_a_negative_count(tiny_dirs, tmp_path):
    """--n -1 sliced off the last prompt ([:-1]) instead of failing."""
    model0, _, data = tiny_dirs
    code, text = _invoke("exits-report", "--model", model0, "--prompts", data, "--n", -1)
    assert code == 2 and "--n" in text and "Traceback" not in text, text


def _model_and_identity(model_dir):
    from cecollm.loading import load_model

    loaded = load_model(str(model_dir))
    return loaded.model, loaded.identity


def test_identity_check_uses_weights():
    a, b = make_tiny_model("gqa", seed=0), make_tiny_model("gqa", seed=1)
    assert model_identity(a) != model_identity(b)


def test_kl_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    from cecollm.edge.heads import NormHead
    from cecollm.exits.train import kl_loss

    torch.manual_seed(0)
    head = NormHead(torch.nn.Identity())
    logits = torch.randn(6, 50) * 3
    top_p, top_idx = torch.softmax(logits, -1).topk(8, dim=-1)
    assert float(kl_loss(head, logits, top_idx, top_p)) < 1e-5
    assert float(kl_loss(head, torch.randn(6, 50), top_idx, top_p)) > 0.1
    # greedy weight 1: cross-entropy to the teacher's top-1 token
    expected = -torch.log_softmax(logits, -1).gather(1, top_idx[:, :1]).mean()
    assert torch.allclose(kl_loss(head, logits, top_idx, top_p, greedy_weight=1.0), expected, atol=1e-4)


def test_selfgen_writes_answers_and_resumes(tiny_dirs, tmp_path):
    model0, _, data = tiny_dirs
    out = tmp_path / "answers.jsonl"
    args = ["exits-selfgen", "--model", model0, "--data", data, "--out", out, "--n", 3, "--max-new-tokens", 4,
            "--batch-size", 2]
    code, text = _invoke(*args)
    assert code == 0 and "3 new answers" in text, text
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in lines] == ["alpaca.jsonl:0", "alpaca.jsonl:1", "alpaca.jsonl:2"]
    code, text = _invoke(*args)
    assert code == 0 and "0 new answers" in text, text


def test_cache_sources_change_when_a_file_is_edited_to_the_same_size(tmp_path):
    from cecollm.exits.collect import file_sources

    data = tmp_path / "alpaca.jsonl"
    data.write_text('{"instruction": "Say hi"}\n')
    before = file_sources([data])
    data.write_text('{"instruction": "Say ho"}\n')  # same name, same size, other text
    after = file_sources([data])
    assert before != after and before[0].startswith("alpaca.jsonl:26:")
    assert file_sources([data]) == after
