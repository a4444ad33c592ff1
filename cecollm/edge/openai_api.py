"""The OpenAI API's shapes as the edge server speaks them: requests, answers, stream chunks, errors.

Requests are checked with pydantic; unknown fields are ignored (as OpenAI-compatible servers do),
but a field that would change the answer in a way this server cannot honour (sampling, n > 1,
log-probabilities, penalties, tools) is refused with a 400 in OpenAI's error shape rather than
silently dropped. Generation is greedy: `temperature` 0 (or left out) and `top_p` 1 are what it
does; `seed` is accepted and changes nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- requests -------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None  # accepted: greedy decoding gives the same answer for any seed
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def budget(self) -> int | None:
        """The most tokens asked for; None: the server's default."""
        return self.max_tokens

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would end every generation at once


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict | None = None

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


def parse_request(body: bytes, kind: type[_Request]) -> _Request:
    """The request of a JSON body, checked; an ApiError (400) names the first problem."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"],
                       param=str(first["loc"][0]) if first["loc"] else None) from None
    _refuse_unsupported(request)
    return request


def _refuse_unsupported(r: _Request) -> None:
    """400 for what greedy, one-answer, text-only decoding cannot give."""
    if r.temperature is not None and r.temperature > 0:
        raise ApiError(400, f"temperature {r.temperature:g} needs sampling, but this server decodes greedily: "
                            "use temperature 0 or leave it out", "temperature")
    if r.top_p is not None and r.top_p < 1 and r.temperature != 0:
        raise ApiError(400, f"top_p {r.top_p:g} needs sampling, but this server decodes greedily: use top_p 1 "
                            "or leave it out", "top_p")
    if r.n != 1:
        raise ApiError(400, f"n={r.n}: this server gives one answer per request (n=1)", "n")
    unsupported = [("presence_penalty", r.presence_penalty), ("frequency_penalty", r.frequency_penalty),
                   ("logit_bias", r.logit_bias)]
    if isinstance(r, ChatRequest):
        unsupported += [("logprobs", r.logprobs), ("top_logprobs", r.top_logprobs), ("tools", r.tools)]
        if r.response_format and r.response_format.get("type", "text") != "text":
            unsupported.append(("response_format", r.response_format))
    else:
        unsupported += [("echo", r.echo), ("suffix", r.suffix), ("logprobs", r.logprobs),
                        ("best_of", r.best_of if r.best_of != 1 else None)]
    for name, value in unsupported:
        if value:
            raise ApiError(400, f"{name} is not supported by this server (greedy decoding, text only)", name)


def chat_messages(r: ChatRequest) -> list[dict]:
    """The conversation as the chat template takes it ("developer" is the template's "system")."""
    if not r.messages:
        raise ApiError(400, "messages must not be empty", "messages")
    out = []
    for i, m in enumerate(r.messages):
        if m.role == "tool":
            raise ApiError(400, f"messages.{i}: tool messages are not supported (no tools)", "messages")
        if isinstance(m.content, list):
            if any(part.type != "text" or part.text is None for part in m.content):
                raise ApiError(400, f"messages.{i}.content: only text parts are supported", "messages")
            text = "".join(part.text for part in m.content)
        else:
            text = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if not any(m["content"].strip() for m in out):
        raise ApiError(400, "messages: every message is empty", "messages")
    return out


def completion_prompt(r: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids."""
    p = r.prompt
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
        return p
    if isinstance(p, str):
        if not p.strip():
            raise ApiError(400, "prompt is empty", "prompt")
        return p
    raise ApiError(400, "prompt: one prompt per request (a string or a list of token ids)", "prompt")


# ---- the text of a generation ------------------------------------------------------------
class TextCutter:
    """A generation's text as its tokens come: what is safe to show so far (whole characters, nothing
    that may be the start of a stop string), and where the first stop string cuts it."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.shown = 0  # characters handed out so far
        self.text = ""  # the text after finish(): cut at the first stop string
        self.stopped = False  # a stop string ended the text

    def add(self, token_id: int) -> str:
        """The text that is safe to show after this token (may be ""); sets `stopped` at a stop string."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        return self._take(full, final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the generation."""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True), final=True)

    def _take(self, full: str, final: bool) -> str:
        if self.stopped:
            return ""
        # text before `shown` was searched already: only a stop string that ends after it is new
        cuts = [i for i in (full.find(s, max(0, self.shown - len(s) + 1)) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            full = full[:max(min(cuts), self.shown)]  # never take back what was shown
            end = len(full)
        elif final:
            end = len(full)
        else:  # hold back a tail that a stop string may begin with
            end = len(full) - max((k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])),
                                  default=0)
        end = max(end, self.shown)
        out, self.shown = full[self.shown:end], end
        if self.stopped or final:
            self.text = full[:end]
        return out


# ---- answers ---------------------------------------------------------------------------------
CHAT, COMPLETION = "chat", "completion"


class Answer:
    """The fixed parts of one answer: its id, creation time, model, kind."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, text: str, finish_reason: str, usage: dict, extra: dict) -> dict:
        """The whole answer (stream: false)."""
        if self.kind == CHAT:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": usage, "cecollm": extra}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              extra: dict | None = None, with_usage: bool = False) -> bytes:
        """One Server-Sent Event of the stream; `role`: the chat stream's first chunk."""
        if self.kind == CHAT:
            delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        if with_usage:
            body["usage"] = None  # OpenAI's chunks say so while the usage chunk is still to come
        if extra is not None:
            body["cecollm"] = extra
        return sse(body)

    def usage_chunk(self, usage: dict) -> bytes:
        """The last chunk before [DONE] with stream_options.include_usage: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == CHAT else "text_completion"
        return sse({**self._head(obj), "choices": [], "usage": usage})


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"
