#!/usr/bin/env python3
"""The broker's overhead and the upload path's throughput, each next to a baseline run here.

1. Round trip of a single-token request (DECIDE) through broker, worker and content manager,
   with the model's compute left out (the worker reports its compute time; it is subtracted),
   next to a bare ZeroMQ REQ/REP round trip on loopback: the ratio is the broker's overhead.
   And the floor of that path on this machine: the same four hops (client -> relay -> echo ->
   relay -> client, ROUTER/DEALER, a poller in the relay) in plain pyzmq doing no work, with the
   echo busy for the worker's median compute time before it answers (so the other processes sleep
   meanwhile and must be woken, as they are through the broker), that time subtracted alike.
2. Upload throughput of float16 hidden states of the default model's width (576), from the
   edge's background sender into the content manager's shared memory, over TCP and through
   the shared-memory fast path, one row per message (decoding) and 128 rows (a prompt).

The model is a small random Llama of the default model's width (its compute does not matter
here). Everything runs on 127.0.0.1; one worker, one thread per process.

    .venv/bin/python tools/bench_broker.py --requests 1000
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np


def _echo_server(address: str, count: int) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(address)
    for _ in range(count):
        sock.send(sock.recv())
    sock.close(0)


def bare_rtts(n: int) -> list[float]:
    """REQ/REP round trips to an echo server in another process, same message size as DECIDE."""
    import zmq

    from cecollm.runtime import free_ports
    from cecollm.wire import edge_cloud as ep

    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    server = multiprocessing.get_context("spawn").Process(target=_echo_server, args=(address, n + 50))
    server.start()
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(address)
    payload = b"".join(ep.Decide(1, 1, 1, 1).to_frames())
    out = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        sock.send(payload)
        sock.recv()
        if i >= 50:  # warm-up
            out.append(time.perf_counter() - t0)
    sock.close(0)
    server.join(10)
    return out


def _relay(front: str, back: str, count: int) -> None:
    """The broker's hops without its work: edge requests to the one echo, its replies back."""
    import zmq

    context = zmq.Context()
    frontend, backend = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
    frontend.bind(front)
    backend.bind(back)
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    echo = backend.recv_multipart()[0]  # its hello: [identity, b"hi"]
    done = 0
    while done < count:
        ready = dict(poller.poll(1000))
        if backend in ready:
            frontend.send_multipart(backend.recv_multipart(copy=False)[1:], copy=False)
            done += 1
        if frontend in ready:
            backend.send_multipart([echo, *frontend.recv_multipart(copy=False)], copy=False)
    context.destroy(0)


def _busy_echo(back: str, count: int, busy: float) -> None:
    """The worker's hops without its work: spins `busy` seconds, answers with the time it spun."""
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(back)
    sock.send(b"hi")
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy:
            pass
        spun = time.perf_counter() - t0
        sock.send_multipart([*frames, str(spun).encode()], copy=False)
    context.destroy(0)


def chain_rtts(n: int, busy: float) -> list[float]:
    """Round trips through a plain-pyzmq relay and echo (the broker's four hops, no work), the echo's
    `busy` seconds subtracted: the floor a request through the broker has on this machine."""
    import zmq

    from cecollm.runtime import free_ports
    from cecollm.wire import edge_cloud as ep

    front, back = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    spawn = multiprocessing.get_context("spawn")
    relay = spawn.Process(target=_relay, args=(front, back, n + 50))
    echo = spawn.Process(target=_busy_echo, args=(back, n + 50, busy))
    relay.start()
    echo.start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)  # a relay or echo that died: zmq.Again, not a hang
    sock.connect(front)
    time.sleep(1.0)  # the echo's hello reaches the relay first
    payload = ep.Decide(1, 1, 1, 1).to_frames()
    out = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        sock.send_multipart([b"", *payload])
        reply = sock.recv_multipart()
        dt = time.perf_counter() - t0 - float(reply[-1])
        if i >= 50:  # warm-up
            out.append(dt)
    context.destroy(0)
    for child in (relay, echo):
        child.join(10)
        if child.is_alive():
            child.kill()
    return out


def _percentiles(values: list[float]) -> tuple[float, float]:
    s = sorted(values)
    return statistics.median(s) * 1e6, s[min(len(s) - 1, int(0.99 * len(s)))] * 1e6


def _save_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=1024, max_position_embeddings=16384,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)


def _keys(broker):
    from cecollm.wire.security import ClientKeys

    return ClientKeys.load(broker.device_keys) if broker.device_keys else None


def broker_rtts(broker, identity: str, n: int) -> tuple[list[float], list[float]]:
    """(round trips, round trips minus the worker's compute) of n DECIDEs on a prefilled session."""
    import zmq

    from cecollm.wire import edge_cloud as ep
    from cecollm.wire.rpc import RpcSocket

    context = zmq.Context.instance()
    keys = _keys(broker)
    rpc = RpcSocket(context, broker.request_address, keys=keys)
    rpc.send(ep.Hello(1, 1, identity, 4, (1, 2), 2, "float32", "float16", False).to_frames())
    welcome = ep.parse(rpc.receive(time.monotonic() + 30))
    assert isinstance(welcome, ep.Welcome), welcome
    push = context.socket(zmq.PUSH)
    if keys is not None:
        keys.secure(push)
    push.connect(broker.upload_address)
    rows = np.random.default_rng(0).standard_normal((n + 50, 576)).astype(np.float16)
    push.send_multipart(ep.Upload(1, welcome.session, 0, 0, rows).to_frames(), copy=False)
    rtt, net = [], []
    for i in range(n + 50):
        t0 = time.perf_counter()
        rpc.send(ep.Decide(1, 2 + i, welcome.session, i).to_frames())
        reply = ep.parse(rpc.receive(time.monotonic() + 30))
        dt = time.perf_counter() - t0
        assert isinstance(reply, ep.Token), reply
        if i >= 50:
            rtt.append(dt)
            net.append(dt - reply.cloud_seconds)
    push.send_multipart(ep.End(1, welcome.session).to_frames())
    push.close(linger=1000)
    rpc.close()
    return rtt, net


def upload_throughput(broker, identity: str, state_address: str, shm: bool, rows_per_message: int,
                      total_rows: int) -> float:
    """Rows per second from the edge's sender until the content manager holds them all."""
    import zmq

    from cecollm.edge.sender import UploadSender
    from cecollm.wire import edge_cloud as ep
    from cecollm.wire import worker_state as sp
    from cecollm.wire.rpc import RpcSocket

    context = zmq.Context.instance()
    keys = _keys(broker)
    rpc = RpcSocket(context, broker.request_address, keys=keys)
    rpc.send(ep.Hello(2, 1, identity, 4, (1, 2), 2, "float32", "float16", shm).to_frames())
    welcome = ep.parse(rpc.receive(time.monotonic() + 30))
    assert isinstance(welcome, ep.Welcome), welcome
    state = RpcSocket(context, state_address)
    sender = UploadSender(context, broker.upload_address, keys=keys)
    rows = np.random.default_rng(1).standard_normal((total_rows, 576)).astype(np.float16)
    chunks = [rows[i : i + rows_per_message] for i in range(0, total_rows, rows_per_message)]
    t0 = time.perf_counter()
    sender.open(2, welcome.session, welcome.segment if shm else "", welcome.capacity, welcome.rows_offset)
    start = 0
    for chunk in chunks:
        sender.rows(start, chunk)
        start += chunk.shape[0]
    state.send(sp.Watch(1, 2, welcome.session, 1, total_rows - 1).to_frames())  # ARRIVED once every row is there
    arrived = sp.parse(state.receive(time.monotonic() + 120))
    seconds = time.perf_counter() - t0
    assert isinstance(arrived, sp.Arrived), arrived
    sender.end()
    sender.close()
    state.close()
    rpc.close()
    return total_rows / seconds


def worker_memory(workers: int) -> tuple[float, float, float]:
    """(sum of workers' PSS, sum of their USS, the content manager's PSS), MiB, with the default model
    after one generation (so every cloud layer's pages have been touched)."""
    import psutil

    from cecollm.broker.launch import BrokerProcess
    from cecollm.config import DEFAULT_MODEL
    from cecollm.edge.client import EdgeClient, EdgeConfig
    from cecollm.edge.heads import edge_setup
    from cecollm.loading import load_model
    from cecollm.spec import ModelSpec

    spec = ModelSpec()  # the machine's default dtype, as the broker's
    loaded = load_model(DEFAULT_MODEL, spec.dtype)
    split, heads = edge_setup(spec, loaded)
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        with BrokerProcess(DEFAULT_MODEL, workers, log_path=log.name) as broker:
            config = EdgeConfig(1, broker.request_address, broker.upload_address, threshold=1.0, max_new_tokens=8, exact=False,
                                timeout=60, keys=broker.device_keys)
            with EdgeClient(loaded.model, loaded.identity, split, heads, config) as client:
                for _ in range(workers):  # LRU: every worker serves some requests
                    client.generate(list(range(100, 140)))
            import re

            pids = [int(p) for p in re.findall(r"worker (\d+) ready \(", Path(log.name).read_text())]
            infos = [psutil.Process(p).memory_full_info() for p in pids]
            children = psutil.Process(broker.proc.pid).children()
            manager = [c for c in children if c.pid not in pids]
            cm = sum(c.memory_full_info().pss for c in manager)
    return sum(i.pss for i in infos) / 2**20, sum(i.uss for i in infos) / 2**20, cm / 2**20


@click.command()
@click.option("--memory", is_flag=True, help="Also measure the memory of 1 and 2 workers with the default model.")
@click.option("--requests", "n", type=int, default=1000, show_default=True, help="Round trips measured.")
@click.option("--rows", "total_rows", type=int, default=8192, show_default=True, help="Rows per throughput run.")
def main(memory: bool, n: int, total_rows: int) -> None:
    import torch

    from cecollm.broker.launch import BrokerProcess
    from cecollm.loading import load_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "width576"
        _save_model(model_dir)
        identity = load_model(str(model_dir)).identity
        bare = bare_rtts(n)
        capacity = max(total_rows, n + 50)
        runs = {}
        for secure in (True, False):  # with keys (CURVE on every socket) and --insecure, in the same run
            with BrokerProcess(str(model_dir), 1, ["--exits", "1,2", "--dtype", "float32", "--capacity", str(capacity), "--wait-seconds",
                                                   "120", "--budget-mb", "4096"], secure=secure) as broker:
                rtt, net = broker_rtts(broker, identity, n)
                state = f"ipc://{tempfile.gettempdir()}/cecollm-{broker.proc.pid}-state.ipc"  # as the broker names it
                rates = {(shm, k): upload_throughput(broker, identity, state, shm, k, total_rows)
                         for shm in (False, True) for k in (1, 128)}
            runs[secure] = (rtt, net, rates)
        compute = statistics.median(r - c for r, c in zip(*runs[False][:2]))  # the worker's, a request
        idle_floor = chain_rtts(n, 0.0)
        busy_floor = chain_rtts(n, compute)
    b50, b99 = _percentiles(bare)
    i50, i99 = _percentiles(idle_floor)
    f50, f99 = _percentiles(busy_floor)
    row_bytes = 576 * 2
    for secure in (True, False):
        rtt, net, rates = runs[secure]
        r50, r99 = _percentiles(rtt)
        n50, n99 = _percentiles(net)
        print(f"{'with keys (CURVE)' if secure else '--insecure'}: single-token request round trip, {n} requests "
              "(microseconds):")
        print(f"  bare ZeroMQ REQ/REP on loopback       p50 {b50:8.0f}  p99 {b99:8.0f}")
        print(f"  floor: the same 4 hops in plain pyzmq p50 {i50:8.0f}  p99 {i99:8.0f}   (no work)")
        print(f"         and the echo busy {compute * 1e3:.2f} ms   p50 {f50:8.0f}  p99 {f99:8.0f}   (its busy time "
              "subtracted, as the worker's compute below)")
        print(f"  through the broker, compute left out  p50 {n50:8.0f}  p99 {n99:8.0f}   ratio p50 {n50 / b50:.1f}x, "
              f"p99 {n99 / b99:.1f}x to bare; {n50 / f50:.2f}x, {n99 / f99:.2f}x to the busy floor")
        print(f"  through the broker, with compute      p50 {r50:8.0f}  p99 {r99:8.0f}   (width 576, 2 cloud layers)")
        print(f"  upload of float16 rows of width 576 ({row_bytes} bytes a row), {total_rows} rows, into the content "
              "manager:")
        for (shm, k), rate in rates.items():
            print(f"    {'shared memory' if shm else 'TCP          '}  {k:4d} rows a message  {rate:10.0f} rows/s  "
                  f"{rate * row_bytes / 1e6:8.1f} MB/s")
    (_, s_net, s_rates), (_, i_net, i_rates) = runs[True], runs[False]
    print("the cost of CURVE (with keys / --insecure, same run):")
    print(f"  round trip, compute left out: p50 {_percentiles(s_net)[0] / _percentiles(i_net)[0]:.2f}x, "
          f"p99 {_percentiles(s_net)[1] / _percentiles(i_net)[1]:.2f}x")
    for k in (1, 128):
        print(f"  TCP upload throughput at {k} rows a message: {s_rates[(False, k)] / i_rates[(False, k)]:.2f}x")
    if memory:
        from cecollm.config import DEFAULT_MODEL
        from cecollm.loading import resolve_model_dir

        size = sum(f.stat().st_size for f in resolve_model_dir(DEFAULT_MODEL).glob("*.safetensors")) / 2**20
        print(f"worker memory with {DEFAULT_MODEL} (float32 weights file {size:.0f} MiB), after generating:")
        for workers in (1, 2):
            pss, uss, cm = worker_memory(workers)
            print(f"  {workers} worker{'s' if workers > 1 else ' '}: PSS {pss:6.0f} MiB in all ({pss / workers:.0f} a worker), "
                  f"private (USS) {uss:6.0f} MiB in all; content manager PSS {cm:.0f} MiB")


if __name__ == "__main__":
    main()

