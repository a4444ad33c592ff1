"""`cecollm-edge --serve HOST:PORT`: the edge device as an OpenAI-compatible HTTP server.

POST /v1/chat/completions and /v1/completions (whole answers or Server-Sent Events), GET
/v1/models, /health and /metrics, on FastAPI and uvicorn. Requests are tokenized and checked on
the event loop; their generations run one at a time on the device's own thread (device.py), so
a slow generation never blocks the server from answering /health, /metrics or a 429.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cecollm.cliutil import tcp_address
from cecollm.edge import openai_api as oa
from cecollm.edge.client import EdgeClient
from cecollm.edge.device import ClientGone, Device, Job
from cecollm.edge.metrics import CONTENT_TYPE, ServerMetrics
from cecollm.edge.openai_api import CHAT, COMPLETION, Answer, ApiError, ChatRequest, CompletionRequest
from cecollm.errors import UserError
from cecollm.prompting import encode_messages

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
DEFAULT_QUEUE = 16


@dataclass(frozen=True)
class ServeOptions:
    """How the server answers; `cecollm-edge --serve` options take their defaults from here."""

    model_name: str  # the model id requests name and /v1/models lists
    queue: int = DEFAULT_QUEUE  # requests that may wait for the device; past it, 429
    default_max_tokens: int = 64  # a request that names no max_tokens gets at most this many
    probe_timeout: float = 2.0  # seconds /health waits for the cloud when it asks it itself


class EdgeServer:
    """The FastAPI app of one edge device (its EdgeClient and tokenizer)."""

    def __init__(self, client: EdgeClient, tokenizer, options: ServeOptions) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.options = options
        self.metrics = ServerMetrics()
        self.device = Device(client, tokenizer, options.queue, self.metrics)
        self.started = int(time.time())
        self.app = self._make_app()

    def close(self) -> None:
        self.device.close()

    @property
    def context_limit(self) -> int:
        """Positions a generation may use: the cloud's capacity (once known) and the model's own limit."""
        limit = getattr(self.client.model.config, "max_position_embeddings", None) or 1 << 30
        return min(limit, self.client.capacity) if self.client.capacity and not self.client.config.standalone \
            else limit

    # ---- the app ---------------------------------------------------------------------------
    def _make_app(self) -> FastAPI:
        app = FastAPI(title="cecollm edge", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(_CountRequests, metrics=self.metrics)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, exc: ApiError):
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

        @app.exception_handler(Exception)
        async def server_error(request: Request, exc: Exception):
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse(ApiError(500, f"internal error: {exc}", type="server_error").body(), status_code=500)

        app.post("/v1/chat/completions")(self._endpoint(CHAT))
        app.post("/v1/completions")(self._endpoint(COMPLETION))
        app.get("/v1/models")(self.models)
        app.get("/health")(self.health)
        app.get("/metrics")(self.scrape)
        return app

    def _endpoint(self, kind: str):
        async def complete(request: Request):
            return await self.complete(request, kind)

        return complete

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    def _model_card(self) -> dict:
        split, c = self.client.split, self.client.config
        mode = "standalone" if c.standalone else "exact" if c.exact else "collab"
        return {"id": self.options.model_name, "object": "model", "created": self.started, "owned_by": "cecollm",
                "max_model_len": self.context_limit,
                "cecollm": {"device_id": c.device_id, "split": split.describe(), "n_layers": split.n_layers,
                            "exits": list(split.exits), "upload_layer": split.upload_layer, "mode": mode,
                            "threshold": c.threshold, "identity": self.client.identity}}

    async def health(self):
        await self.device.probe_if_stale(self.options.probe_timeout)
        d = self.device
        return {"status": "ok", "model": self.options.model_name, "cloud": d.cloud_health(),
                "queue": {"running": d.running, "waiting": d.waiting, "limit": d.queue_limit}}

    async def scrape(self):
        return Response(self.metrics.text(), media_type=CONTENT_TYPE)

    # ---- completions -----------------------------------------------------------------------
    async def complete(self, request: Request, kind: str):
        arrived = time.perf_counter()
        req = oa.parse_request(await request.body(), ChatRequest if kind == CHAT else CompletionRequest)
        if req.model != self.options.model_name:
            raise ApiError(400, f"model {req.model!r} is not served here; this server serves "
                                f"{self.options.model_name!r}", "model", "model_not_found")
        prompt_ids = self._encode(req, kind)
        job = Job(prompt_ids, self._budget(req, len(prompt_ids)), req.stops(), arrived)
        answer = Answer(kind, self.options.model_name)
        if req.stream:
            job.events, job.loop = asyncio.Queue(), asyncio.get_running_loop()
        self.device.submit(job)  # or 429
        watch = asyncio.create_task(_watch_disconnect(request, job))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(job, answer, include_usage, watch), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await asyncio.wrap_future(job.future)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        except Exception as exc:
            raise _failure(exc) from None
        finally:  # done, failed, or cancelled (the server stops): the generation stops in every case
            watch.cancel()
            job.gone.set()
        return answer.complete(job.text, job.finish_reason, self._usage(job), self._extra(job))

    async def _stream(self, job: Job, answer: Answer, include_usage: bool, watch: asyncio.Task):
        try:
            if answer.kind == CHAT:
                yield answer.chunk("", role=True, with_usage=include_usage)
            while True:
                kind, value = await job.events.get()
                if kind == "end":
                    break
                yield answer.chunk(value, with_usage=include_usage)
            if value is None:
                yield answer.chunk(None, job.finish_reason, extra=self._extra(job), with_usage=include_usage)
                if include_usage:
                    yield answer.usage_chunk(self._usage(job))
            elif not isinstance(value, ClientGone):
                yield oa.sse(_failure(value).body())
            yield oa.DONE
        finally:  # finished, or the client left (the response is cancelled): the generation stops either way
            job.gone.set()
            watch.cancel()

    def _encode(self, req, kind: str) -> list[int]:
        try:
            if kind == CHAT:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
                return encode_messages(self.tokenizer, oa.chat_messages(req))
            prompt = oa.completion_prompt(req)
            if isinstance(prompt, str):
                return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        except UserError as exc:
            raise ApiError(400, str(exc)) from None
        vocab = self.client.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
        return prompt

    def _budget(self, req, prompt_tokens: int) -> int:
        """The request's max_tokens, checked against what the cloud can hold."""
        limit, asked = self.context_limit, req.budget()
        if prompt_tokens >= limit:
            param = "messages" if isinstance(req, ChatRequest) else "prompt"
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens, but a generation may hold at most {limit} "
                                "positions (prompt and answer, the cloud's capacity)", param, "context_length_exceeded")
        if asked is not None and prompt_tokens + asked > limit:
            raise ApiError(400, f"max_tokens {asked} is too many: the prompt has {prompt_tokens} tokens and a "
                                f"generation may hold at most {limit} positions; ask for at most "
                                f"{limit - prompt_tokens}", "max_tokens", "context_length_exceeded")
        return asked or min(self.options.default_max_tokens, limit - prompt_tokens)

    def _usage(self, job: Job) -> dict:
        return oa.usage(len(job.prompt_ids), len(job.result.token_ids))

    def _extra(self, job: Job) -> dict:
        """The `cecollm` object: where the tokens were decided, what crossed the link, where the time went."""
        stats = asdict(job.result.stats)
        stats.pop("prompt_tokens")
        return {**stats, "device_id": self.client.config.device_id, "queue_seconds": round(job.queue_seconds, 6),
                "request_number": job.number, "served_number": job.served}


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Mark the job gone when its client closes the connection (the body has been read: what comes
    next on the request channel is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.gone.set()
            return


class _CountRequests:
    """ASGI middleware: cecollm_requests_total by endpoint and status, counted when the response starts."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not started:
                self.metrics.requests.labels(endpoint, "500").inc()


# ---- listening ------------------------------------------------------------------------------
def _failure(exc: BaseException) -> ApiError:
    """The answer to a generation that failed: the cloud refusing this device (another edge holds its id,
    another model, a key that may not act for it) is a 503 with its one line; anything else is a bug, a 500
    with its traceback in the log."""
    if isinstance(exc, UserError):
        log.warning("generation refused: %s", exc)
        return ApiError(503, str(exc), type="server_error", code="cloud_refused")
    log.error("generation failed", exc_info=exc)
    return ApiError(500, f"the generation failed: {exc}", type="server_error")


def listen_socket(address: str) -> socket.socket:
    """A socket bound to HOST:PORT (":PORT" or "PORT": loopback; "[::1]:PORT" for IPv6); a UserError
    in one line for an address that is malformed or cannot be bound."""
    family, kind, proto, _, where = tcp_address(address, "--serve", "127.0.0.1:8000")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
    except OSError as exc:
        sock.close()
        raise UserError(f"--serve {address!r}: cannot listen there: {exc.strerror or exc}") from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def _uvicorn(server: EdgeServer, verbose: bool):
    import uvicorn

    config = uvicorn.Config(server.app, log_config=None, log_level="info" if verbose else "warning",
                            access_log=verbose, lifespan="off", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(server: EdgeServer, sock: socket.socket, verbose: bool = False) -> None:
    """Serve until SIGINT or SIGTERM, then stop the jobs and the device's thread, and return (exit code 0)."""
    web = _uvicorn(server, verbose)

    def stop(signum, frame) -> None:
        web.should_exit = True

    # uvicorn takes these signals while it serves and raises them again once it has shut down; with
    # these handlers in place that second delivery stops nothing, so the caller closes the client.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        web.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()


class ServerThread:
    """An EdgeServer served on a thread of this process (tests, benchmarks): start(), url, stop()."""

    def __init__(self, server: EdgeServer, sock: socket.socket, verbose: bool = False) -> None:
        self.server, self.sock = server, sock
        self.uvicorn = _uvicorn(server, verbose)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, name="edge-server",
                                       daemon=True)

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the edge server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)
        self.server.close()
