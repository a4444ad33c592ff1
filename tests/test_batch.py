"""Batches across devices: several sequences through the cloud layers and the LM head in one pass give
the tokens transformers gives each alone, and the same as one request at a time."""

from __future__ import annotations

import threading

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cecollm.broker.launch import BrokerProcess
from cecollm.cache.kv import KVCache
from cecollm.cloud.batch import BatchFolder, Fold, passes
from cecollm.cloud.partition import CloudPartition
from cecollm.edge.client import EdgeClient, EdgeConfig
from cecollm.edge.heads import HeadSet
from cecollm.layers import DecoderRunner
from cecollm.runtime import free_ports
from cecollm.split import Split

from conftest import assert_greedy_equal, hf_greedy, make_tiny_model

PROMPTS = [[5, 17, 33, 2, 9], [100, 7, 7, 300, 41, 12, 3], [250, 1, 64], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]


class Device:
    """One sequence: the layers below the upload layer on its own KV (the edge), and its cloud KV."""

    def __init__(self, runner: DecoderRunner, split: Split, prompt: list[int]) -> None:
        self.runner, self.split = runner, split
        self.edge = KVCache.for_runner(runner, 0, split.upload_layer)
        self.cloud = KVCache.for_runner(runner, split.upload_layer, split.n_layers - split.upload_layer)
        self.pending = list(prompt)  # tokens whose rows are not made yet
        self.length = 0  # positions the edge has run
        self.tokens: list[int] = []

    @torch.inference_mode()
    def rows(self) -> torch.Tensor:
        """The upload-layer rows of the pending tokens, [1, n, hidden]."""
        x = self.runner.embed(torch.tensor([self.pending]))  # [1, n, hidden]
        rope = self.runner.rope(self.length, self.length + len(self.pending), x)
        for index in range(self.split.upload_layer):
            x = self.runner.run_layer(index, x, self.length, self.edge, rope)
        self.length += len(self.pending)
        self.pending = []
        return x

    def fold(self) -> Fold:
        folded = self.cloud.length(self.split.upload_layer)
        return Fold(self.cloud, self.rows(), folded)

    def take(self, token: int) -> None:
        self.tokens.append(token)
        self.pending = [token]


def _generate(model, split: Split, prompts, steps: int, together: bool) -> list[list[int]]:
    """Greedy tokens of every prompt, the cloud computing all devices in one batch, or one at a time; the
    last device joins two steps late (its prompt next to the others' single rows)."""
    runner = DecoderRunner(model)
    folder = BatchFolder(runner, split)
    devices = [Device(runner, split, p) for p in prompts]
    for step in range(steps + 2):
        active = [d for i, d in enumerate(devices) if len(d.tokens) < steps and (i < len(devices) - 1 or step >= 2)]
        groups = [active] if together else [[d] for d in active]
        for group in groups:
            for d, verdict in zip(group, folder.run([d.fold() for d in group])):
                d.take(verdict.token)
    return [d.tokens for d in devices]


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_a_batch_of_devices_gives_each_the_tokens_of_transformers(name):
    model = make_tiny_model(name)
    split = Split.create(model.config.num_hidden_layers, (2, 4))
    together = _generate(model, split, PROMPTS, 12, together=True)
    alone = _generate(model, split, PROMPTS, 12, together=False)
    assert together == alone
    assert together == [hf_greedy(model, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_batch_in_a_2_byte_dtype_gives_the_tokens_of_transformers_in_it(dtype):
    """Rows of several devices round apart from rows alone in 2-byte arithmetic: equal up to near-ties."""
    model = make_tiny_model("gqa").to(dtype)
    split = Split.create(model.config.num_hidden_layers, (2, 4))
    together = _generate(model, split, PROMPTS, 12, together=True)
    alone = _generate(model, split, PROMPTS, 12, together=False)
    for prompt, batched, single in zip(PROMPTS, together, alone):
        ref = hf_greedy(model, prompt, 12)
        assert_greedy_equal(model, prompt, batched, ref)
        assert_greedy_equal(model, prompt, single, ref)


def test_a_batch_of_one_is_the_unbatched_partition_bit_for_bit():
    model = make_tiny_model("gqa")
    split = Split.create(model.config.num_hidden_layers, (2, 4))
    runner = DecoderRunner(model)
    a, b = Device(runner, split, PROMPTS[1]), Device(runner, split, PROMPTS[1])
    part = CloudPartition(runner, split, b.cloud)
    for _ in range(5):
        verdict = BatchFolder(runner, split).run([a.fold()])[0]
        part.receive(part.received, b.rows())
        with torch.inference_mode():
            token, prob = part.decide(part.received - 1)
        assert (verdict.token, verdict.prob) == (token, prob)
        a.take(token)
        b.take(token)
    n = a.cloud.length(split.upload_layer)
    assert torch.equal(a.cloud.storage[:, :, :, :n], b.cloud.storage[:, :, :, :n])


def test_a_verification_in_a_batch_finds_the_first_wrong_draft():
    model = make_tiny_model("gqa")
    split = Split.create(model.config.num_hidden_layers, (2, 4))
    runner = DecoderRunner(model)
    prompt = PROMPTS[0]
    truth = hf_greedy(model, prompt, 4)
    checked, other = Device(runner, split, prompt + truth[:3]), Device(runner, split, PROMPTS[2])
    first = len(prompt) - 1  # the row after which truth[0] comes
    drafts = {first: truth[0], first + 1: truth[1], first + 2: truth[2] + 1}  # the third draft is wrong
    verify, decide = checked.fold(), other.fold()
    verify.drafts = drafts
    verdict, decided = BatchFolder(runner, split).run([verify, decide])
    assert (verdict.row, verdict.token) == (first + 2, truth[2]) and verdict.rolls_back(verify)
    assert decided.token == hf_greedy(model, PROMPTS[2], 1)[0] and not decided.rolls_back(decide)


def _batch_sizes(port: int) -> dict[float, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "cecollm_broker_batch_size")
    return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}


@pytest.mark.parametrize("max_batch", [4, 1])
def test_devices_through_one_worker_batched_and_one_at_a_time_match_transformers(loaded, model_dir, tmp_path,
                                                                                  max_batch):
    torch.set_num_threads(1)
    split = Split.create(loaded.n_layers, (2, 4))
    port = free_ports(1)[0]
    extra = ["--exits", "2,4", "--max-batch", str(max_batch), "--metrics", f"127.0.0.1:{port}"]
    results, errors = {}, []
    with BrokerProcess(str(model_dir), workers=1, extra=extra, log_path=tmp_path / "broker.log") as b:

        def run(device: int) -> None:
            config = EdgeConfig(device_id=device, broker=b.request_address, upload=b.upload_address,
                                keys=b.device_keys, exact=device % 2 == 0, threshold=1.0 if device % 2 else 0.5,
                                max_new_tokens=16, timeout=30.0, shm=device == 3)
            try:
                with EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, split.exits),
                                config) as client:
                    results[device] = client.generate(PROMPTS[device]).token_ids
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(d,)) for d in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        sizes = _batch_sizes(port)
    assert not errors
    for device, prompt in enumerate(PROMPTS):  # paper's mode at 1.0 (every token the cloud's) and exact mode
        assert results[device] == hf_greedy(loaded.model, prompt, 16), f"device {device}"
    batches = sizes[float("inf")]
    assert batches > 0
    if max_batch == 1:
        assert sizes[1.0] == batches  # never more than one request at a time
    else:
        assert sizes[4.0] == batches and sizes[1.0] < batches  # some batch had several devices' requests


def _width576(dtype):
    """A random two-layer Llama of SmolLM2's widths (the matrix shapes whose kernels decide the rounding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval().to(dtype)


@pytest.mark.parametrize("packed", [False, True])
def test_a_bfloat16_batch_is_bit_for_bit_each_request_alone(packed):
    """Prompts longer than a pass, prompts and single rows packed in one pass, and rows that continue a sequence
    (as a verification's) next to others: every verdict and KV entry as computed alone, on F.linear and on
    packed weights (on this CI's CPUs, with AVX512-BF16, passes of unbounded rows round the batch apart, and
    before rows that continue a sequence attended row by row such rows did too)."""
    from cecollm import packing

    model = _width576(torch.bfloat16)
    if packed and not packing.pack_linears(model):
        pytest.skip("no oneDNN bfloat16 kernels here")
    split = Split.create(3, (1,))
    runner = DecoderRunner(model)
    prompts = [list(range(3, 43)), [7], list(range(50, 70)), [9], list(range(100, 137))]  # 40, 1, 20, 1, 37 rows
    together, alone = [Device(runner, split, p) for p in prompts], [Device(runner, split, p) for p in prompts]
    folder = BatchFolder(runner, split)
    assert passes([Fold(d.cloud, torch.zeros(1, len(d.pending), 1), 0) for d in together]) == [[0], [1, 2, 3], [4]]
    same = True
    for step in range(3):
        verdicts = folder.run([d.fold() for d in together])
        singles = [folder.run([d.fold()])[0] for d in alone]
        same &= all((v.token, v.prob) == (s.token, s.prob) for v, s in zip(verdicts, singles))
        for a, b, v in zip(together, alone, verdicts):
            a.take(v.token)
            b.take(v.token)
        if step == 0:  # the next fold of two devices: several rows that continue their sequences
            for d in (together[1], alone[1], together[3], alone[3]):
                d.pending += [11, 12, 13, 14, 15]
    n = [d.cloud.length(1) for d in together]
    same &= all(torch.equal(a.cloud.storage[:, :, :, :k], b.cloud.storage[:, :, :, :k])
                for a, b, k in zip(together, alone, n))
    assert same
