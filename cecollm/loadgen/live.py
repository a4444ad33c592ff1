"""Real edges for fanout: record one edge's trace, or run N real EdgeClients at once (`live` mode).

Live devices are threads sharing one model; on a small machine they fight the cloud for the
CPU, so what is measured is the machine, not the cloud: replay (replay.py) is the measurement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cecollm.dtypes import name_of
from cecollm.errors import UserError
from cecollm.loadgen.config import FanoutConfig, check_config, read_prompt_texts
from cecollm.loadgen.report import ClientSummary
from cecollm.loadgen.trace import Trace

log = logging.getLogger(__name__)


def load_edge(config: FanoutConfig):
    """(loaded model, split, heads, prompt token ids) for live runs and recording."""
    from cecollm.cliutil import set_threads
    from cecollm.edge.heads import edge_setup
    from cecollm.prompting import encode_prompt
    from cecollm.spec import ModelSpec

    texts = read_prompt_texts(config)
    set_threads(config.threads)
    spec = ModelSpec.from_options(config.model, config.exits, config.upload_layer, config.heads, config.dtype)
    loaded = spec.load()
    split, heads = edge_setup(spec, loaded)
    prompt_ids = [encode_prompt(loaded.tokenizer, t, config.raw) for t in texts]
    return loaded, split, heads, prompt_ids


def record_trace(config: FanoutConfig, path: str | Path | None = None,
                 progress: Callable[[int], None] | None = None) -> Trace:
    """Run one real edge (device `device_base`) over the prompts and write its trace to `path`
    (default config.trace); a generation with timeouts, re-uploads or fallbacks is refused."""
    from cecollm.loadgen.trace import TraceHeader, TracingClient, unclean

    check_config(config)
    path = path or config.trace
    if not path:
        raise UserError("give the trace file to write (--trace)")
    loaded, split, heads, prompt_ids = load_edge(config)
    with TracingClient(loaded.model, loaded.identity, split, heads, config.edge, keep_rows=True) as client:
        for index, ids in enumerate(prompt_ids):
            result = client.generate_traced(index, ids)
            why = unclean(result)
            if why:
                raise UserError(f"recording prompt {index}: {why}; the trace would not be the cloud's work")
            if progress:
                progress(1)
        header = TraceHeader(str(config.model), loaded.identity, split.n_layers, tuple(split.exits),
                             split.upload_layer, name_of(client.wire_dtype),
                             loaded.model.config.hidden_size, config.threshold, config.max_new_tokens, "",
                             dtype=client.dtype)
        trace = client.trace(header)
    trace.save(path)
    return trace


def order(count: int, client: int, rotate: bool) -> list[int]:
    first = client % count if rotate else 0
    return [*range(first, count), *range(first)]


def live_devices(config: FanoutConfig, summaries: list[ClientSummary], delays: list[float], stop: threading.Event,
              progress, user_errors: list[UserError]) -> list[threading.Thread]:
    """Threads that run one real EdgeClient each (one shared model); a UserError stops them all."""
    from cecollm.edge.client import EdgeConfig
    from cecollm.loadgen.trace import TracingClient

    loaded, split, heads, prompt_ids = load_edge(config)

    def device(i: int) -> None:
        s = summaries[i]
        edge = EdgeConfig(**{**asdict(config.edge), "device_id": s.device_id})
        if stop.wait(delays[i]):
            return
        t0 = time.perf_counter()
        try:
            with TracingClient(loaded.model, loaded.identity, split, heads, edge) as client:
                for index in order(len(prompt_ids), i, config.rotate):
                    if stop.is_set():
                        break
                    result = client.generate_traced(index, prompt_ids[index])
                    st = result.stats
                    s.generations += 1
                    s.cloud_tokens += st.cloud_tokens
                    s.edge_tokens += st.edge_tokens
                    s.timeouts += st.timeouts
                    s.outputs.append(list(result.token_ids))
                    if st.standalone_reason or st.reuploads:
                        s.error(f"prompt {index}: {st.standalone_reason or f'{st.reuploads} re-uploads'}")
                    if progress:
                        progress(1)
                s.latencies = client.recorder.latencies
                s.requests = len(s.latencies) + s.timeouts
                s.cloud_seconds = client.recorder.cloud_seconds
        except UserError as exc:
            user_errors.append(exc)
            stop.set()
        except Exception as exc:  # noqa: BLE001 (counted and reported, the other devices go on)
            log.exception("device %d failed", s.device_id)
            s.error(f"{exc.__class__.__name__}: {exc}")
        s.wall_seconds = time.perf_counter() - t0

    return [threading.Thread(target=device, args=(i,), name=f"fanout-{i}", daemon=True)
            for i in range(config.clients)]


