"""OpenAI-compatible HTTP front end over the same :class:`IngressAPI` as the gRPC server.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` = server-sent events ending in
``data: [DONE]``, after a ``usage`` chunk if ``stream_options.include_usage``), ``GET /v1/models``, ``GET /health``
(200 ready / 503 draining; never needs a token).
Errors use OpenAI's body, with ``param`` naming the field::

    {"error": {"message": "max_tokens: must be > 0, got 0", "type": "invalid_request_error",
               "param": "max_tokens", "code": null}}

Extensions beyond OpenAI (vLLM-style): ``top_k``, ``seed``, ``stop_token_ids``, ``ignore_eos``, ``priority`` (higher
= more important, as gRPC's: the reverse of vLLM's), ``request_id`` (idempotency key; also the ``X-Request-Id``
header), ``length_hint``, ``ttft_slo_s``, ``tpot_slo_s``, ``add_special_tokens``, ``tenant`` (the app the request comes
from, for the length predictor: gRPC's field); completions may take ``prompt``
as a list of token ids; each choice carries ``token_ids``. A chat's messages are rendered by the model's chat
template (the ingress' ``render_chat``; vLLM's ``add_generation_prompt`` and ``chat_template_kwargs``), else sent as a
``role: content`` transcript.
``stop`` strings are applied here (vLLM's semantics: ``_stop_at_strings``).
Unsupported OpenAI options that would change the output (``n`` > 1, ``logprobs``, ``echo``,
``best_of`` > 1, batched prompts, penalties, ``response_format``, ``tools``, ...: ``_REFUSED``) are rejected with the
field named rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.control.api import (
    GenerateRequest,
    IngressAPI,
    IngressError,
    InvalidRequest,
)
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.server.admission import InflightLimiter, Slot, cancel_quietly, close_stream
from scheduler.server.auth import AuthConfig, http_check
from scheduler.server.validate import (
    CHAT_FIELDS,
    HTTP_FIELDS,
    FieldNames,
    admission_reason,
    new_request_id,
    relabel,
    request_status_for,
    request_status_of_finish,
    validate_generate,
)
from scheduler.telemetry.metrics import NULL_RECORDER, Recorder, RequestStatus
from scheduler.telemetry.tracing import Span, SpanKind, Stage, Tracing, set_outcome

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False  # a last chunk with ``usage`` and no choices, before ``data: [DONE]``


# OpenAI's (and vLLM's) options that this server cannot honour, with their neutral values (and null): any other value
# would change the output, so it is refused with the field named, not dropped with the other unknown fields.
_REFUSED: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "logit_bias": ({},),
    "min_tokens": (0,),
    "min_p": (0,),
    "top_logprobs": (0,),
    "suffix": ("",),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "functions": ([],),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "include_stop_str_in_output": (False,),
    "prompt_logprobs": (0,),
    "truncate_prompt_tokens": (),
    "bad_words": ([],),
    "allowed_token_ids": (),
    "echo": (False,),  # a chat's (vLLM); a completion's is a declared field
    # A chat's (vLLM): the model's own template renders the messages; a request's template would run client Jinja
    # here (vLLM too refuses it unless started with --trust-request-chat-template).
    "chat_template": (),
    "continue_final_message": (False,),
    "documents": ([],),
}
# Each stop string is searched for in every chunk's text, and a stream holds back as many characters.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1024


class _Common(BaseModel):
    # Other fields OpenAI clients send and that do not change the output (user, ...) are kept here unread, in
    # model_extra, for _check_unsupported to look at the _REFUSED ones.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: Any = None
    priority: int = 0
    request_id: str | None = None
    length_hint: int | None = None
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    # vLLM's: add the tokenizer's special tokens (BOS...) to a text prompt. Unset: a completion's yes; a chat's no
    # when the model's chat template rendered it (the template writes them itself), else yes.
    add_special_tokens: bool | None = None
    tenant: str | None = None  # llmsched's: the app it comes from (the length predictor's tenant); "" = unset

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # OpenAI and vLLM take null as "not set" (clients send "temperature": null and the like): the default.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # passed to the chat template (vLLM's too)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    # vLLM's chat template options: end the prompt with the assistant's turn opening; more template variables.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = (
            status,
            message,
            type_,
            param,
            headers,
        )
        self.recorded = False  # already counted in metrics (errors of an admitted request)


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(_error_body(message, type_, param), status_code=status, headers=headers)


def _error_body(message: str, type_: str, param: str | None) -> dict[str, Any]:
    """OpenAI's error body (a response's, or a stream's error event)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


def _internal_error(exc: BaseException) -> str:
    return f"internal error ({type(exc).__name__})"  # as gRPC's INTERNAL: the type only; the server logs the rest


def http_error_for(exc: IngressError) -> HTTPError:
    """The HTTP status/type for an ingress error (the class names it: ``control/api.py``, as for gRPC)."""
    headers = None
    if exc.retry_after_s is not None:
        # HTTP Retry-After is whole seconds.
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    elif exc.final:
        # OpenAI clients retry any 5xx by default (openai-python twice): a quarantined request was re-sent to more
        # engines. They obey this header (gRPC: the SDK retries UNAVAILABLE only).
        headers = {"x-should-retry": "false"}
    return HTTPError(exc.http_status, str(exc), type_=exc.http_type, param=exc.field, headers=headers)


class _Auth:
    """Pure ASGI middleware, outermost: the bearer token on every path but the probes' (deny by default), judged on
    the headers before any body is read (an unauthenticated client had the server buffer up to the body limit, and
    its 413 counted as the API's invalid input)."""

    def __init__(self, app: Any, auth: AuthConfig, open_paths: tuple[str, ...]) -> None:
        self.app, self.auth, self.open_paths = app, auth, open_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            # NOTE: the path the router matches: behind a proxy's root_path or mounted in another app, the URL's
            # path carries a prefix (a "/v1/" prefix test on it once served /v1/* to anyone).
            path = _route_path(scope)
            if not any(path == p or path.startswith(p + "/") for p in self.open_paths):
                denied = http_check(self.auth, Headers(scope=scope).get("authorization"))
                if denied is not None:
                    status, message = denied
                    # RFC 6750 section 3: a 401 names the scheme it wants.
                    challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                    type_ = "authentication_error" if status == 401 else "permission_error"
                    await error_response(status, message, type_=type_, headers=challenge)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class _BodyLimit:
    """Pure ASGI middleware: buffer the request body up to ``max_bytes``; beyond -> 413 (chunked bodies too)."""

    def __init__(self, app: Any, max_bytes: int, on_reject: Callable[[], None] | None = None) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send)
            return
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._reject(scope, send)
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later reads: wait for the disconnect, as the server would deliver it

        await self.app(scope, replay, send)

    async def _reject(self, scope: dict[str, Any], send: Any) -> None:
        if self.on_reject is not None:  # counted as invalid input, as gRPC counts its RESOURCE_EXHAUSTED TooLarge
            self.on_reject()
        # The prompt's field as the route's handler names it (a chat's is its ``messages``): the field the client sent.
        field = _ROUTE_FIELDS.get(_route_path(scope), HTTP_FIELDS)["prompt"]
        resp = error_response(413, f"{field}: the request body exceeds the server's limit of {self.max_bytes} "
                                   f"bytes; send a shorter {field}", param=field)
        await resp(scope, None, send)  # type: ignore[arg-type]


def _prompt_of(req: CompletionRequest) -> tuple[str | None, tuple[int, ...] | None]:
    p = req.prompt
    if isinstance(p, str):
        return p, None
    if p and all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise HTTPError(
                400, "prompt: batched prompts are not supported; send one request per prompt", param="prompt"
            )
        return str(p[0]), None
    return None, tuple(int(x) for x in p)


def _chat_prompt(ingress: IngressAPI, req: ChatCompletionRequest) -> tuple[str, bool]:
    """The chat's prompt, and whether the model's chat template rendered it. The ingress renders it (it knows the
    model; ``render_chat``, optional on ``IngressAPI``); one without a template (the simulated backend's byte
    tokenizer) gets a plain ``role: content`` transcript."""
    messages = _chat_messages(req.messages)
    render = getattr(ingress, "render_chat", None)
    if render is not None:
        try:
            text = render(
                messages,
                add_generation_prompt=req.add_generation_prompt,
                chat_template_kwargs=req.chat_template_kwargs,
            )
        except IngressError as e:
            raise http_error_for(e) from None
        if text is not None:
            return text, True
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + ("\nassistant:" if req.add_generation_prompt else ""), False


def _chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as a chat template takes them: ``role``, string ``content`` (text parts joined by newlines, as
    vLLM's "string" content format), and ``name`` if set."""
    if not messages:
        raise HTTPError(400, "messages: must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if content is None and m.role != "assistant":
            # As OpenAI's API: only an assistant turn may go without content (it answered with tool calls).
            # Read as "", a user turn with none was rendered as an empty message and answered 200.
            raise HTTPError(400, f"messages[{i}].content: required for a {m.role!r} message",
                            param=f"messages[{i}].content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
                raise HTTPError(
                    400,
                    f"messages[{i}].content: only text parts with a string 'text' are supported",
                    param=f"messages[{i}].content",
                )
            content = "\n".join(parts)
        msg: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _check_unsupported(req: _Common) -> None:
    if req.n != 1:
        raise HTTPError(400, f"n: only n=1 is supported, got {req.n}", param="n")
    if req.stream_options is not None and not req.stream:  # OpenAI's 400 (null is unset: accepted)
        raise HTTPError(400, "stream_options: only allowed when stream is true", param="stream_options")
    stops = _stops(req)
    if len(stops) > MAX_STOP_STRINGS:
        raise HTTPError(400, f"stop: at most {MAX_STOP_STRINGS} strings", param="stop")
    if "" in stops:
        raise HTTPError(400, "stop: must not hold an empty string", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise HTTPError(400, f"stop: at most {MAX_STOP_CHARS} characters a string", param="stop")
    if req.logprobs is not None and req.logprobs is not False:  # a completion's logprobs=0 asks for them too
        raise HTTPError(400, "logprobs: not supported", param="logprobs")
    for name, value in (req.model_extra or {}).items():
        if name in _REFUSED and value is not None and value not in _REFUSED[name]:
            raise HTTPError(400, f"{name}: not supported", param=name)
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise HTTPError(400, "echo: not supported", param="echo")
        if req.best_of not in (None, 1):
            raise HTTPError(400, "best_of: not supported", param="best_of")


def _stops(req: _Common) -> tuple[str, ...]:
    return (req.stop,) if isinstance(req.stop, str) and req.stop else tuple(req.stop or ())


def _generate_request(
    req: _Common,
    text: str | None,
    ids: tuple[int, ...] | None,
    request_id: str | None,
    max_tokens: int,
    names: FieldNames = HTTP_FIELDS,
    *,
    add_special_tokens: bool = True,
) -> GenerateRequest:
    """``add_special_tokens``: the endpoint's default, unless the request sets it."""
    _check_unsupported(req)
    g = GenerateRequest(
        request_id=req.request_id or request_id or new_request_id(),
        prompt=text,
        prompt_token_ids=ids,
        sampling=SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=0 if req.top_k == -1 else req.top_k,  # vLLM's -1 = disabled, as our 0
            seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
        ),
        model=req.model or None,
        priority=req.priority,
        ttft_slo_s=req.ttft_slo_s,
        tpot_slo_s=req.tpot_slo_s,
        length_hint=req.length_hint,
        add_special_tokens=add_special_tokens if req.add_special_tokens is None else req.add_special_tokens,
        tenant=req.tenant or None,
    )
    try:
        validate_generate(g, names)
    except InvalidRequest as e:
        raise HTTPError(400, str(e), param=e.field) from None
    return g


def _header_value(value: str) -> str:
    """``value`` if it can travel in an HTTP header as is, else percent-encoded (ids may hold any printable
    Unicode; a header holds latin-1, and encoding it would otherwise fail after the request already ran)."""
    if value.isascii() and value.isprintable():
        return value
    return urllib.parse.quote(value, safe="")


_COMPLETIONS, _CHAT = "/v1/completions", "/v1/chat/completions"
# Each generate route's field names: its handler's errors and the body limit's (``_BodyLimit``, ahead of the
# router) name the same fields.
_ROUTE_FIELDS: dict[str, FieldNames] = {_COMPLETIONS: HTTP_FIELDS, _CHAT: CHAT_FIELDS}


def _route_path(scope: dict[str, Any]) -> str:
    """The path the router matches: ``scope["path"]`` less the ``root_path`` prefix a proxy or a mount adds (as
    starlette's private ``get_route_path``, not imported: private API)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):]
    return path


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def build_app(
    ingress: IngressAPI,
    *,
    auth: AuthConfig | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ready: Callable[[], bool] | None = None,
    default_model: str = "default",
    recorder: Recorder | None = None,
    tracing: Tracing | None = None,
    limiter: InflightLimiter | None = None,
    metrics_path: str | None = None,
) -> Any:
    """The OpenAI-compatible ASGI app (a FastAPI app wrapped in a body-size limit).

    Args:
        ingress: the control plane's ingress.
        auth: the same tokens as the gRPC server (client token on every path but /health and metrics_path);
            None = open.
        max_body_bytes: larger request bodies get 413.
        ready: readiness probe for /health (None = always ready).
        default_model: reported by /v1/models when the cluster state names none.
        recorder: Prometheus recorder (shared with the gRPC server); None = no metrics.
        tracing: spans, parented on a W3C ``traceparent`` header; None = the global OpenTelemetry provider.
        limiter: in-flight bound per priority (429 + Retry-After when full; share the gRPC server's).
        metrics_path: also expose the recorder's registry here (e.g. "/metrics"; no token needed). The chart
            scrapes a separate metrics port instead (``start_metrics_server``).
    """
    app = FastAPI(title="llmsched", docs_url=None, redoc_url=None, openapi_url=None)
    deps = _Deps(ingress, recorder if recorder is not None else NULL_RECORDER,
                 tracing if tracing is not None else Tracing(), limiter)
    if metrics_path is not None:
        registry = getattr(recorder, "registry", None)
        if registry is None:
            raise ValueError("metrics_path needs a recorder with a registry (MetricsRecorder)")
        from scheduler.telemetry.metrics import metrics_asgi_app

        app.mount(metrics_path, metrics_asgi_app(registry))

    @app.exception_handler(HTTPError)
    async def _http_error(_request: Request, exc: HTTPError) -> JSONResponse:
        if exc.status == 400 and not exc.recorded:
            deps.recorder.on_invalid(api="http")
        return error_response(exc.status, exc.message, type_=exc.type, param=exc.param, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own errors (undecodable body, unknown path, wrong method) in OpenAI's shape too.
        if exc.status_code == 400:
            deps.recorder.on_invalid(api="http")
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        param = "body" if exc.status_code == 400 else None
        message = f"body: {exc.detail}" if param else str(exc.detail)
        return error_response(exc.status_code, message, type_=type_, param=param, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        deps.recorder.on_invalid(api="http")
        err = (exc.errors() or [{}])[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # A union field reports the failing member type as the last loc part (e.g. "list[int]"); drop it.
        param = next((p for p in loc if not p.isdigit() and "[" not in p), None) or "body"
        index = next((p for p in loc if p.isdigit()), None)
        name = f"{param}[{index}]" if index is not None and param != "body" else param
        return error_response(400, f"{name}: {err.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
        # A bug: OpenAI's body too (Starlette's own was text/plain "Internal Server Error", no error to read). Starlette
        # re-raises it after this response, so the server still logs it.
        return error_response(500, _internal_error(exc), type_="server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = ready() if ready is not None else True
        return JSONResponse({"status": "ok" if ok else "draining"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        try:
            state = await ingress.cluster_state()
            names = sorted({i.model for i in state.instances}) or [default_model]
        except (IngressError, NotImplementedError):
            names = [default_model]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "llmsched"} for n in names],
        }

    @app.post(_COMPLETIONS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        text, ids = _prompt_of(body)
        names = _ROUTE_FIELDS[_COMPLETIONS]
        g = _generate_request(body, text, ids, request.headers.get("x-request-id"), body.max_tokens, names)
        return await _respond(deps, g, body, body.model or default_model, request, chat=False, names=names)

    @app.post(_CHAT)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        # `is not None`, not `or`: an explicit 0 is an error to report, not "unset"; and errors name the field the
        # client actually sent.
        names = _ROUTE_FIELDS[_CHAT]
        if body.max_completion_tokens is not None:
            max_tokens, names = body.max_completion_tokens, {**names, "max_tokens": "max_completion_tokens"}
        else:
            max_tokens = body.max_tokens
        prompt, rendered = _chat_prompt(ingress, body)
        g = _generate_request(
            body,
            prompt,
            None,
            request.headers.get("x-request-id"),
            max_tokens,
            names,
            add_special_tokens=not rendered,  # a template writes the special tokens it wants (vLLM's default)
        )
        return await _respond(deps, g, body, body.model or default_model, request, chat=True, names=names)

    open_paths = ("/health", *([metrics_path.rstrip("/")] if metrics_path else []))
    body_limit = _BodyLimit(app, max_body_bytes, on_reject=lambda: deps.recorder.on_invalid(api="http"))
    return _Auth(body_limit, auth, open_paths) if auth is not None else body_limit


class _Deps:
    __slots__ = ("ingress", "limiter", "recorder", "tracing")

    def __init__(self, ingress: IngressAPI, recorder: Recorder, tracing: Tracing,
                 limiter: InflightLimiter | None) -> None:
        self.ingress, self.recorder, self.tracing, self.limiter = ingress, recorder, tracing, limiter


class _Scope:
    """One admitted HTTP generate: its limiter slot, metrics and span; :meth:`end` runs exactly once."""

    def __init__(self, deps: _Deps, g: GenerateRequest, request: Request, names: FieldNames) -> None:
        self.deps, self.g, self.names = deps, g, names
        self.span: Span = deps.tracing.start_span(
            Stage.INGRESS,
            request_id=g.request_id,
            parent=deps.tracing.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.route": request.url.path, "llmsched.priority": g.priority},
        )
        self.slot: Slot | None = None
        self.started = False
        self.key = g.request_id  # the recorder's key (its id, unless that id was already in flight)
        self.status = RequestStatus.CANCELLED  # unless told otherwise: the client went away
        self.n_tokens = 0
        self.last_instance = ""
        self.done = False  # the ingress stream reached its end (no cancel needed)
        self.stream: AsyncIterator[TokenChunk] | None = None  # the ingress stream, once generate was called
        self._ended = False

    def admit(self) -> None:
        """Take a slot and start the request's metrics. Raises Overloaded (a 429) when the limiter is full."""
        if self.deps.limiter is not None:
            self.slot = self.deps.limiter.acquire(self.g.priority)
        self.key = self.deps.recorder.on_request_start(self.g.request_id, priority=self.g.priority, api="http")
        self.started = True

    def chunk(self, c: TokenChunk) -> None:
        if c.token_ids and self.n_tokens == 0:
            self.deps.recorder.on_first_token(self.key, instance_id=c.instance_id)
        self.n_tokens += len(c.token_ids)
        self.last_instance = c.instance_id or self.last_instance
        if c.finished:
            self.done = True
            self.status = request_status_of_finish(c.finish_reason)

    def fail(self, e: IngressError) -> HTTPError:
        """Record an ingress error; the HTTP error to raise."""
        rec = self.deps.recorder
        reason = admission_reason(e, started=self.started)
        if reason is not None:
            rec.on_reject(priority=self.g.priority, reason=reason, api="http",
                          request_id=self.key if self.started else None)
            self.started = False  # on_reject ended it
            self.status = RequestStatus.REJECTED
        else:
            self.status = request_status_for(e)
        self.done = True
        # The ingress and the engines name fields as the engine API does (prompt_token_ids, sampling.top_k): name
        # the body's field instead.
        err = http_error_for(relabel(e, self.names))
        err.recorded = True
        return err

    async def close(self) -> None:
        """End the request: cancel it in the ingress if unfinished, close its stream, then :meth:`end`."""
        try:
            if not self.done:  # the client went away (cancelled task) or the stream broke: free the engine
                self.done = True
                await cancel_quietly(self.deps.ingress, self.g.request_id)
            if self.stream is not None:
                await close_stream(self.stream, self.g.request_id)
        finally:
            self.end()  # NOTE: after the close: the slot bounds the streams open in the ingress

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.slot is not None:
            self.slot.release()
        if self.started:
            self.deps.recorder.on_finish(self.key, status=self.status, output_tokens=self.n_tokens,
                                         instance_id=self.last_instance)
        self.span.set_attribute("llmsched.output_tokens", self.n_tokens)
        set_outcome(self.span, ok=self.status is RequestStatus.FINISHED, status=self.status.value)
        self.span.end()






class _ScopedStreamingResponse(StreamingResponse):
    """Ends the request scope however the response ends, even when the body iterator never started (a client
    that disconnects before the first byte would otherwise leak the limiter slot)."""

    def __init__(self, *args: Any, scope: _Scope, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scope = scope

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._scope.close()


def _ended_in_error(c: TokenChunk) -> HTTPError | None:
    """The error of a stream that ended ``error: ...`` (an engine raised on the request; gRPC passes the reason on):
    vLLM's 500, or its error event mid-stream, rather than a 200 with a finish_reason no OpenAI client knows. Final
    (the ingress recovers engine failures itself), so not to be retried, as a quarantined request's 500."""
    if c.finished and request_status_of_finish(c.finish_reason) is RequestStatus.FAILED:
        return HTTPError(
            500, c.finish_reason or "error", type_="server_error", headers={"x-should-retry": "false"}
        )
    return None


def _usage_chunk(body: _Common) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _respond(
    deps: _Deps,
    g: GenerateRequest,
    body: _Common,
    model: str,
    request: Request,
    *,
    chat: bool,
    names: FieldNames,
) -> Any:
    """Run ``g`` (built from ``body``: its ``stream``, ``stream_options`` and ``stop`` are read here) and answer it,
    streamed or whole."""
    ingress = deps.ingress
    stream, usage_chunk, stops = body.stream, _usage_chunk(body), _stops(body)
    sc = _Scope(deps, g, request, names)
    handed_off = False  # the streaming response owns the scope from then on
    try:
        with deps.tracing.activate(sc.span):
            try:
                sc.admit()
                chunks = sc.stream = ingress.generate(g)
                if stops:
                    chunks = _stop_at_strings(chunks, stops, ingress, g.request_id)
                # Errors before the first chunk become a proper HTTP status. NOTE: watched, as collect() below: the
                # server does not cancel a handler whose client hung up, so one gone while queued kept its place and
                # had its prefill run (and its KV taken) until the first token.
                first = await _unless_disconnected(request, anext(aiter(chunks)))
            except IngressError as e:
                raise sc.fail(e) from None
            except StopAsyncIteration:
                # An ingress bug (every stream ends with a finished chunk): a server error, not a 200 with no output.
                logger.error("%s: the ingress stream ended without a chunk", g.request_id)
                raise HTTPError(
                    500, "internal error (the ingress stream ended without a chunk)", type_="server_error"
                ) from None
            except _ClientGone:  # never delivered; close() cancels, status stays cancelled
                return JSONResponse({}, status_code=499)
            sc.chunk(first)
            failed = _ended_in_error(first)
            if failed is not None:
                raise failed
            created = int(time.time())
            rid = ("chatcmpl-" if chat else "cmpl-") + g.request_id
            if stream:
                gen = _sse_stream(sc, first, chunks, rid, model, created, chat=chat, usage_chunk=usage_chunk)
                handed_off = True
                return _ScopedStreamingResponse(
                    gen,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Request-Id": _header_value(g.request_id)},
                    scope=sc,
                )
            ids: list[int] = []
            text: list[str] = []
            seen = [first]  # the last chunk collected

            async def collect() -> None:
                c = first
                while True:
                    ids.extend(c.token_ids)
                    text.append(c.text)
                    seen[0] = c
                    if c.finished:
                        return
                    try:
                        c = await anext(chunks)
                    except StopAsyncIteration:
                        sc.done = True
                        sc.status = RequestStatus.FINISHED
                        return
                    sc.chunk(c)

            try:
                # NOTE: nothing else reads the connection of a non-streaming response: without this watch a client
                # that hangs up is never noticed, its request runs to the end and is counted finished.
                await _unless_disconnected(request, collect())
            except _ClientGone:
                return JSONResponse({}, status_code=499)  # never delivered; close() cancels, status stays cancelled
            except IngressError as e:
                raise sc.fail(e) from None
            last = seen[0]
            failed = _ended_in_error(last)
            if failed is not None:
                raise failed
            # Before close(): the ingress holds the request until then and counts the prompt it tokenized.
            prompt_tokens = await _prompt_tokens(ingress, g)
    except Exception:
        # Not an ingress error sc.fail() recorded (those set done): the server failed it (a 500), which is neither a
        # client cancel nor a success. CancelledError (the client went away) is a BaseException and stays cancelled.
        if not sc.done:
            sc.status = RequestStatus.FAILED
        raise
    finally:
        if not handed_off:
            await sc.close()
    usage = _usage(prompt_tokens, len(ids))
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(text)},
            "finish_reason": last.finish_reason,
            "token_ids": ids,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": "".join(text),
            "logprobs": None,
            "finish_reason": last.finish_reason,
            "token_ids": ids,
        }
        obj = "text_completion"
    return JSONResponse(
        {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage},
        headers={"X-Request-Id": _header_value(g.request_id)},
    )


def _usage(prompt_tokens: int | None, completion_tokens: int) -> dict[str, int | None]:
    return {
        "prompt_tokens": prompt_tokens,  # null when the ingress cannot count a text prompt (never a wrong 0)
        "completion_tokens": completion_tokens,
        "total_tokens": None if prompt_tokens is None else prompt_tokens + completion_tokens,
    }


async def _prompt_tokens(ingress: IngressAPI, g: GenerateRequest) -> int | None:
    """The prompt's length in tokens: a text prompt's is the ingress's (``prompt_tokens``, optional on
    ``IngressAPI``); ``None`` when it cannot say. Asked before the request's stream is closed: ``Ingress`` then
    counts the tokens it made of the prompt (after, it tokenizes the prompt again)."""
    if g.prompt_token_ids is not None:
        return len(g.prompt_token_ids)
    count = getattr(ingress, "prompt_tokens", None)
    if count is None:
        return None
    try:
        # In a thread: an ingress may tokenize a long prompt, which on the loop held every other stream.
        return int(await asyncio.to_thread(count, g))
    except Exception:  # usage is informational: never fail a finished request over it
        logger.debug("prompt_tokens of %s failed", g.request_id, exc_info=True)
        return None


class _ClientGone(Exception):
    """The HTTP client disconnected before its (non-streaming) response was ready."""


async def _until_disconnected(request: Request) -> None:
    # The body has been read: the only message left on the connection is http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await ``work`` (an awaitable) unless the client disconnects first: then cancel it and raise _ClientGone."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and gone.exception() is not None:  # cannot watch the connection: just wait
            await asyncio.wait((task,))
        client_left = not task.done()
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))  # its end, without taking its CancelledError for ours
    if client_left:
        raise _ClientGone()
    return task.result()


async def _stop_at_strings(
    chunks: AsyncIterator[TokenChunk], stops: tuple[str, ...], ingress: IngressAPI, request_id: str
) -> AsyncIterator[TokenChunk]:
    """``chunks`` with vLLM's ``stop`` strings applied: the text ends before the first one found (left out), the
    chunk that completed it is the last (finish_reason "stop"; its tokens count, as in vLLM) and the request is
    cancelled in the ingress. As vLLM's stop buffer, the last (longest stop string - 1) characters of the text are
    held back until a later chunk (or the end) tells whether they begin a stop string."""
    hold = max(map(len, stops)) - 1
    held = ""
    async for c in chunks:
        text = held + c.text
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            if not c.finished:
                await cancel_quietly(ingress, request_id)
            yield dataclasses.replace(c, text=text[: min(hits)], finished=True, finish_reason="stop")
            return
        cut = len(text) if c.finished else max(0, len(text) - hold)
        held = text[cut:]
        yield dataclasses.replace(c, text=text[:cut])


async def _sse_stream(
    sc: _Scope,
    first: TokenChunk,
    chunks: AsyncIterator[TokenChunk],
    rid: str,
    model: str,
    created: int,
    *,
    chat: bool,
    usage_chunk: bool,
) -> AsyncIterator[bytes]:
    # With stream_options.include_usage, OpenAI's chunks carry "usage": null, then a last one carries it.
    extra = {"usage": None} if usage_chunk else {}
    try:
        c = first
        role_sent = False
        while True:
            failed = _ended_in_error(c)
            if failed is not None:  # what it made, then the error event
                c = dataclasses.replace(c, finished=False, finish_reason=None)
            if chat:
                delta: dict[str, Any] = {"content": c.text}
                if not role_sent:
                    delta["role"] = "assistant"
                    role_sent = True
                choice: dict[str, Any] = {"index": 0, "delta": delta}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": c.text, "logprobs": None}
                obj = "text_completion"
            choice.update(
                finish_reason=c.finish_reason if c.finished else None,
                token_ids=list(c.token_ids),
                first_index=c.index,
            )
            head = {"id": rid, "object": obj, "created": created, "model": model}
            if failed is None or c.token_ids or c.text:
                yield _sse({**head, "choices": [choice], **extra})
            if failed is not None:
                raise failed
            if c.finished:
                break
            try:
                # NOTE: the span is current only around the ingress call, never across a yield: a generator
                # closed later from another task could not detach it.
                with sc.deps.tracing.activate(sc.span):
                    c = await anext(chunks)
            except StopAsyncIteration:
                sc.done = True
                sc.status = RequestStatus.FINISHED
                break
            sc.chunk(c)
        if usage_chunk:
            # (Before the scope's close, as a whole response's: the ingress still holds the request.)
            prompt_tokens = await _prompt_tokens(sc.deps.ingress, sc.g)
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, sc.n_tokens)})
    except IngressError as e:
        err = sc.fail(e)
        yield _sse(_error_body(err.message, err.type, err.param))
    except HTTPError as e:  # a stream that ended in error (counted failed by sc.chunk)
        yield _sse(_error_body(e.message, e.type, e.param))
    except Exception as e:
        sc.status = RequestStatus.FAILED  # a server error mid-stream, not a client cancel
        logger.error("%s: stream failed", sc.g.request_id, exc_info=e)
        # An error event, as for an ingress error: ending the body instead broke the connection, which clients report
        # as a network error (openai-python: APIConnectionError).
        yield _sse(_error_body(_internal_error(e), "server_error", None))
    # After an error event too, as vLLM's server: a client reading to the end finds the end it waits for.
    yield b"data: [DONE]\n\n"
    # NOTE: no clean-up here: _ScopedStreamingResponse closes the scope however the response ends.
