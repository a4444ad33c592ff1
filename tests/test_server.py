"""The edge's OpenAI-compatible server against real clients: the official `openai` package and httpx,
a live broker (subprocess) with a tiny model, and the server on a thread (or as `cecollm-edge --serve`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import orjson
import pytest
import torch
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from cecollm.broker.launch import BrokerProcess
from cecollm.edge.client import EdgeClient, EdgeConfig
from cecollm.edge.heads import HeadSet
from cecollm.edge.server import EdgeServer, ServeOptions, ServerThread, listen_socket
from cecollm.prompting import encode_prompt
from cecollm.runtime import free_ports
from cecollm.split import Split

EXITS = (2, 4)
CAPACITY = 64  # the broker's positions per device: small, so a long prompt is easy to make
NAME = "tiny"
PROMPT = "The capital of France is"  # the random tiny model answers it with printable and split characters


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def broker(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "broker.log"
    with BrokerProcess(str(model_dir), workers=1, extra=["--exits", "2,4", "--capacity", str(CAPACITY)],
                       log_path=log) as b:
        yield b


def _config(broker, device: int, **options) -> EdgeConfig:
    return EdgeConfig(device_id=device, broker=broker.request_address, upload=broker.upload_address,
                      keys=broker.device_keys, **{"exact": False, "threshold": 1.0, "max_new_tokens": 8, "timeout": 30.0,
                                                  **options})


def _client(loaded, config: EdgeConfig) -> EdgeClient:
    split = Split.create(loaded.n_layers, EXITS)
    return EdgeClient(loaded.model, loaded.identity, split, HeadSet.lens(loaded.model, EXITS), config)


@contextlib.contextmanager
def _serving(loaded, config: EdgeConfig, queue: int = 16, probe_timeout: float = 2.0):
    with _client(loaded, config) as client:
        server = EdgeServer(client, loaded.tokenizer, ServeOptions(NAME, queue, config.max_new_tokens, probe_timeout))
        running = ServerThread(server, listen_socket("127.0.0.1:0")).start()
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="module")
def served(loaded, broker):
    with _serving(loaded, _config(broker, 21)) as running:
        yield running


def _openai(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _reference(loaded, broker, ids: list[int], max_new_tokens: int, **options) -> str:
    """What EdgeClient itself generates for these prompt ids (another device id, same settings)."""
    with _client(loaded, _config(broker, 40, max_new_tokens=max_new_tokens, **options)) as client:
        result = client.generate(ids)
    return loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def _raw_ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_and_completions_equal_the_edge_client(loaded, broker, served):
    client = _openai(served)
    chat_ref = _reference(loaded, broker, encode_prompt(loaded.tokenizer, PROMPT), 8)
    raw_ref = _reference(loaded, broker, _raw_ids(loaded, PROMPT), 8)
    assert chat_ref and raw_ref

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                                          seed=7, temperature=0)
    assert chat.choices[0].message.content == chat_ref and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length" and chat.object == "chat.completion"
    assert chat.usage.completion_tokens == 8
    assert chat.usage.prompt_tokens == len(encode_prompt(loaded.tokenizer, PROMPT))
    extra = chat.model_extra["cecollm"]
    assert (extra["cloud_tokens"], extra["edge_tokens"], extra["fallback_tokens"]) == (8, 0, 0)
    assert extra["bytes_up"] > 0 and extra["cloud_seconds"] > 0 and extra["device_id"] == 21

    text = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8)
    assert text.choices[0].text == raw_ref and text.object == "text_completion" and text.usage.total_tokens > 8

    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}],
                                                 max_completion_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_ref
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-2].model_extra["cecollm"]["cloud_tokens"] == 8

    pieces = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == raw_ref
    assert pieces[-1].choices[0].finish_reason == "length" and len({p.id for p in pieces}) == 1


def _check_stop_strings(loaded, broker, running, **options) -> dict:
    """A stop string from the first half of the answer cuts the text there and ends the generation;
    the last answer's `cecollm` object."""
    ids = _raw_ids(loaded, PROMPT)
    full = _reference(loaded, broker, ids, 16, **options)
    stop = next(full[i:i + 2] for i in range(1, len(full) // 2) if full[i:i + 2].strip() and not full[i].isspace())
    expected = full[:full.find(stop)]
    client = _openai(running)
    answer = client.completions.create(model=NAME, prompt=ids, max_tokens=16, stop=[stop, "never appears ~~"])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 16  # the generation ended at the stop string
    pieces = list(client.completions.create(model=NAME, prompt=ids, max_tokens=16, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected
    assert pieces[-1].choices[0].finish_reason == "stop"
    return answer.model_extra["cecollm"]


def test_stop_strings_cut_the_text_and_end_the_generation(loaded, broker, served):
    _check_stop_strings(loaded, broker, served)


def test_stop_strings_in_the_exact_mode(loaded, broker):
    """The exact mode shows confirmed tokens only: a stop string among them ends the generation too."""
    with _serving(loaded, _config(broker, 26, exact=True, threshold=0.5)) as running:
        extra = _check_stop_strings(loaded, broker, running, exact=True, threshold=0.5)
    assert extra["drafts"] > 0 and extra["verifies"] > 0


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_400_in_openai_shape(served):
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    url = served.url + "/v1/chat/completions"
    with httpx.Client(timeout=60) as http:
        assert "JSON" in _error(http.post(url, content=b"{not json"))["message"]
        assert _error(http.post(url, json={**chat, "model": "gpt-4"}))["code"] == "model_not_found"
        assert _error(http.post(url, json={**chat, "messages": []}))["param"] == "messages"
        assert "sampling" in _error(http.post(url, json={**chat, "temperature": 0.7}))["message"]
        assert _error(http.post(url, json={**chat, "top_p": 0.5}))["param"] == "top_p"
        assert _error(http.post(url, json={**chat, "n": 2}))["param"] == "n"
        assert _error(http.post(url, json={"messages": chat["messages"]}))["param"] == "model"
        long_prompt = {"model": NAME, "prompt": [5] * (CAPACITY + 1)}
        error = _error(http.post(served.url + "/v1/completions", json=long_prompt))
        assert error["code"] == "context_length_exceeded" and f"at most {CAPACITY}" in error["message"]
        error = _error(http.post(served.url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 500}))
        assert error["param"] == "max_tokens"
        assert http.post(url, json={**chat, "temperature": 0, "top_p": 0.5, "max_tokens": 2}).status_code == 200
    with pytest.raises(openai.BadRequestError, match="greedily"):
        _openai(served).chat.completions.create(model=NAME, messages=chat["messages"], temperature=1.0)


def test_models_and_health(served):
    (card,) = _openai(served).models.list().data
    assert card.id == NAME and card.model_extra["cecollm"]["exits"] == list(EXITS)
    assert card.model_extra["max_model_len"] == CAPACITY
    health = httpx.get(served.url + "/health", timeout=60)
    assert health.status_code == 200
    cloud = health.json()["cloud"]
    assert cloud["reachable"] is True and cloud["capacity"] == CAPACITY and cloud["problem"] is None


def test_health_says_when_the_cloud_does_not_answer(loaded):
    port, upload = free_ports(2)
    config = EdgeConfig(device_id=1, broker=f"tcp://127.0.0.1:{port}", upload=f"tcp://127.0.0.1:{upload}",
                        insecure=True, threshold=1.0, max_new_tokens=4, hello_timeout=0.3)
    with _serving(loaded, config, probe_timeout=0.3) as running:
        health = httpx.get(running.url + "/health", timeout=60)
        assert health.status_code == 200
        cloud = health.json()["cloud"]
        assert cloud["reachable"] is False and "did not answer HELLO" in cloud["problem"]
        # the edge still answers, alone
        answer = _openai(running).completions.create(model=NAME, prompt=PROMPT, max_tokens=4)
        assert answer.model_extra["cecollm"]["fallback_tokens"] == 4


def test_metrics_count_what_was_served(loaded, broker):
    with _serving(loaded, _config(broker, 23)) as running:
        client = _openai(running)
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5)
        list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, stream=True))
        httpx.post(running.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
        text = httpx.get(running.url + "/metrics", timeout=60).text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str, sample: str, **labels) -> float:
        (v,) = [s.value for s in families[name].samples if s.name == sample and s.labels == labels]
        return v

    assert families["cecollm_time_to_first_token_seconds"].type == "histogram"
    assert value("cecollm_time_to_first_token_seconds", "cecollm_time_to_first_token_seconds_count") == 2
    assert value("cecollm_inter_token_latency_seconds", "cecollm_inter_token_latency_seconds_count") == 8
    assert value("cecollm_generation_tokens", "cecollm_generation_tokens_total", decided_by="cloud") == 10
    assert value("cecollm_generation_tokens", "cecollm_generation_tokens_total", decided_by="edge") == 0
    assert value("cecollm_fallbacks", "cecollm_fallbacks_total", kind="timeout") == 0
    assert value("cecollm_sent_bytes", "cecollm_sent_bytes_total", via="network") > 0
    assert value("cecollm_requests", "cecollm_requests_total", endpoint="/v1/completions", status="200") == 2
    assert value("cecollm_requests", "cecollm_requests_total", endpoint="/v1/completions", status="400") == 1


def _wait_for(condition, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: {what}")
        time.sleep(0.02)


def test_a_full_queue_answers_429(loaded, broker):
    with _serving(loaded, _config(broker, 24), queue=1) as running:
        gates = []  # a failed assert must not leave the device thread waiting on a gate (close() joins it)
        try:
            device = running.server.device
            gate = threading.Event()
            gates.append(gate)
            device.executor.submit(gate.wait)  # the device is busy until the gate opens
            first = {}
            waiter = threading.Thread(target=lambda: first.update(r=httpx.post(
                running.url + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 4}, timeout=120)))
            waiter.start()
            _wait_for(lambda: device.waiting == 1, "the first request to queue")
            refused = httpx.post(running.url + "/v1/completions", json={"model": NAME, "prompt": PROMPT}, timeout=60)
            assert _error(refused, 429)["code"] == "rate_limit_exceeded"
            assert int(refused.headers["Retry-After"]) >= 1
            with pytest.raises(openai.RateLimitError):
                _openai(running).completions.create(model=NAME, prompt=PROMPT)
            gate.set()
            waiter.join(120)
            assert first["r"].status_code == 200
            assert first["r"].json()["choices"][0]["text"] == _reference(loaded, broker, _raw_ids(loaded, PROMPT), 4)

            # a waiting request whose client gives up is never generated
            gate = threading.Event()
            gates.append(gate)
            device.executor.submit(gate.wait)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(running.url + "/v1/completions", json={"model": NAME, "prompt": PROMPT}, timeout=1.0)
            (job,) = device.live
            _wait_for(job.gone.is_set, "the server to notice the client left")
            gate.set()
            _wait_for(lambda: device.idle and not device.live, "the queue to drain")
            assert job.result is None and device.started == job.served == 2
            text = httpx.get(running.url + "/metrics", timeout=60).text
            (ttft,) = [f for f in text_string_to_metric_families(text) if f.name == "cecollm_time_to_first_token_seconds"]
            assert [s.value for s in ttft.samples if s.name.endswith("_count")] == [1]  # the first request only
        finally:
            for gate in gates:
                gate.set()


def _device_segments(broker, device: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"cecollm-{broker.proc.pid}-{device}-")]


def test_a_client_that_leaves_mid_stream_stops_its_generation(loaded, broker, monkeypatch):
    device_id, budget = 25, 40
    with _serving(loaded, _config(broker, device_id, max_new_tokens=budget)) as running:
        client = running.server.client
        real, paused, resume, seen = client.generate, threading.Event(), threading.Event(), []

        def gated(prompt_ids, on_token, max_new_tokens=None):
            def hold_after_the_second(record):
                seen.append(record.token_id)
                on_token(record)
                if len(seen) == 2:  # mid-generation: the cloud holds the device's state now
                    paused.set()
                    resume.wait(60)

            return real(prompt_ids, hold_after_the_second, max_new_tokens)

        monkeypatch.setattr(client, "generate", gated)
        stream = _openai(running).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=budget, stream=True)
        next(iter(stream))
        _wait_for(paused.is_set, "the generation to reach its second token")
        assert _device_segments(broker, device_id)
        (job,) = running.server.device.live
        stream.close()
        _wait_for(job.gone.is_set, "the server to notice the client left")
        resume.set()
        _wait_for(lambda: not _device_segments(broker, device_id), "the cloud to release the device's state", 10)
        _wait_for(lambda: running.server.device.idle, "the device to finish")
        assert len(seen) == 3  # the token after the client left stopped the generation


def test_cli_serve(loaded, broker, model_dir, tmp_path):
    from cecollm.edge.cli import edge_command

    common = ["--model", str(model_dir), "--exits", "2,4", "--broker", broker.request_address, "--upload",
              broker.upload_address, "--keys", broker.device_keys, "--threshold", "1.0", "--max-new-tokens", "6"]
    (port,) = free_ports(1)
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", "from cecollm.edge.cli import main; main()", *common,
                                 "--device-id", "3", "--serve", f"127.0.0.1:{port}", "--served-model-name", NAME],
                                stderr=err, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        _wait_for(lambda: b"serving device 3" in log.read_bytes() or proc.poll() is not None, "the server", 180)
        assert proc.poll() is None, log.read_text()
        assert f"at http://127.0.0.1:{port}/v1" in log.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}])
        out = CliRunner().invoke(edge_command, [*common, "--device-id", "31", "--prompt", PROMPT, "--json"])
        assert out.exit_code == 0, out.output
        row = orjson.loads(out.stdout.strip().splitlines()[-1])
        assert answer.choices[0].message.content == row["text"] and answer.usage.completion_tokens == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_cli_serve_refuses_a_mismatched_cloud_at_start(broker, model_dir):
    from cecollm.edge.cli import edge_command

    out = CliRunner().invoke(edge_command, ["--model", str(model_dir), "--exits", "2,3", "--broker",
                                            broker.request_address, "--upload", broker.upload_address, "--keys",
                                            broker.device_keys, "--serve", "127.0.0.1:0"])
    assert out.exit_code == 2 and "split mismatch" in out.output and "Traceback" not in out.output


@pytest.mark.parametrize("address, message", [("localhost:http", "port in 0..65535"),
                                              ("no-such-host.invalid:8000", "unknown host"),
                                              ("127.0.0.1:99999", "port in 0..65535")])
def test_cli_serve_bad_address_is_one_line(address, message):
    from cecollm.edge.cli import edge_command

    out = CliRunner().invoke(edge_command, ["--insecure", "--serve", address])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and message in out.output, out.output


def test_cli_serve_port_in_use_is_one_line():
    from cecollm.edge.cli import edge_command

    with contextlib.closing(listen_socket("127.0.0.1:0")) as busy:
        busy.listen(1)
        out = CliRunner().invoke(edge_command, ["--insecure", "--serve", f"127.0.0.1:{busy.getsockname()[1]}"])
    assert out.exit_code == 2 and out.output.startswith("error: --serve") and "cannot listen" in out.output
    out = CliRunner().invoke(edge_command, ["--insecure", "--serve", "127.0.0.1:0", "--prompt", "hi"])
    assert out.exit_code == 2 and "--serve answers HTTP requests" in out.output
