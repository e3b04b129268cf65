"""The OpenAI-compatible HTTP server: FastAPI routes that translate requests for the engine and back.

    app = create_app(ServerConfig(served_model_name="smollm2"), load=lambda: Engine(...))
    uvicorn.run(app)

The server holds no generation state: the engine does, behind `EngineRunner` (one thread). A handler
checks everything first — the key, the body's size, the parameters, the model name, each prompt against
the context and the KV cache — so a bad request is answered 400 and never queued; then it submits its
choices and streams (SSE) or collects their outputs. A client that goes away has its requests aborted.
A request the engine fails on is answered 500 (or its stream ends with an error event); the server goes on.
The model loads in a thread after the server starts listening: /health answers 503 until it is ready.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics,
POST /tokenize, POST /detokenize; GET /server_info (the served name, for routers that discover it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from magicdec.engine.outputs import StepOutput
from magicdec.engine.request import RequestSpec
from magicdec.llm import PromptError
from magicdec.runtime.sampling import SamplingParams
from magicdec.server.logprobs import chat_logprobs, completion_logprobs, join, prompt_logprobs
from magicdec.server.metrics import ServerMetrics
from magicdec.server.protocol import (
    APIError,
    ChatRequest,
    Common,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad,
    chat_messages,
    check_common,
    completion_prompts,
    error_body,
    stop_strings,
    structured_grammar,
    usage,
)
from magicdec.server.runner import (
    ClientGone,
    EngineDead,
    EngineRunner,
    Job,
    QueueFull,
    ShuttingDown,
    Stream,
    output_error,
    request_error,
)
from magicdec.server.tools import (
    CLOSE,
    OPEN,
    ToolError,
    ToolStream,
    check_tools,
    parse_tool_calls,
    tag_expr,
    tool_grammar,
    uses_hermes,
)
from magicdec.serving import Engine

log = logging.getLogger("magicdec.server")

LOAD_DELAY_ENV = "MAGICDEC_SERVE_LOAD_DELAY"  # seconds to wait before loading (tests observe /health's 503)
RETRY_AFTER_S = 1


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 64  # engine requests waiting beyond the running batch before new ones get 503
    max_body_bytes: int = 1 << 20
    log_interval: float = 10.0  # seconds between throughput lines while busy
    on_fatal: Callable[[BaseException], None] | None = None  # the engine failed to load or to step
    dev_endpoints: bool = False  # POST /reset_prefix_cache (vLLM's VLLM_SERVER_DEV_MODE)


@dataclass
class ServerState:
    config: ServerConfig
    metrics: ServerMetrics
    engine: Engine | None = None
    runner: EngineRunner | None = None
    load_error: BaseException | None = None
    draining: bool = False
    started: float = field(default_factory=time.time)

    def drain(self) -> None:
        """Stop accepting requests (SIGTERM): new ones get 503, running ones finish."""
        self.draining = True
        if self.runner is not None:
            self.runner.draining = True

    @property
    def serving(self) -> bool:
        """The model is loaded and the engine runs (a router may be sending requests here)."""
        return self.runner is not None and self.runner.error is None

    def drained(self) -> bool:
        """No submitted request is still running."""
        return self.runner is None or self.runner.outstanding == 0

    def ready(self) -> tuple[Engine, EngineRunner]:
        if self.load_error is not None or (self.runner is not None and self.runner.error is not None):
            raise APIError(503, "the engine failed; see the server's log", type="server_error", code="engine_error")
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.engine is None or self.runner is None:
            raise APIError(503, "the model is loading; retry shortly", type="server_error", code="model_loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.engine, self.runner

    def check_model(self, model: str | None) -> None:
        name = self.config.served_model_name
        if model is not None and model != name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{name}` (GET /v1/models).",
                           param="model", code="model_not_found")


# ---- the gate: key and body size, before any route runs ---------------------------------------------------
class Gate:
    """Pure ASGI middleware: the API key (every route but /health), then the body's size (Content-Length
    and the bytes actually sent); the body is read here and replayed to the app."""

    def __init__(self, app: Any, config: ServerConfig) -> None:
        self.app, self.config = app, config
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health":
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if not (secrets.compare_digest(token, self.key) and scheme.lower() == b"bearer"):  # (RFC 7235)
                return await send_json(send, 401, error_body(
                    "Invalid or missing API key: send the header 'Authorization: Bearer <key>'.",
                    "invalid_request_error", None, "invalid_api_key"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.config.max_body_bytes
        too_large = error_body(f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)",
                               "invalid_request_error", None, "request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await send_json(send, 413, too_large)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                return await send_json(send, 413, too_large)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def send_json(send: Callable[..., Any], status: int, body: dict[str, Any],
                    headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": raw})


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """pydantic's errors as one message naming the parameters (unknown ones first; a value that fits none
    of a parameter's types once, with the types)."""
    unknown: list[str] = []
    other: dict[str, list[str]] = {}  # parameter → messages
    unions: dict[str, list[str]] = {}  # parameter → the types it may have
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        name = ".".join(loc)
        top = loc[0] if loc else ""
        if e.get("type") == "extra_forbidden":
            unknown.append(name)
        elif e.get("type") == "json_invalid":
            other.setdefault("", []).append(
                f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
        elif e.get("type") == "missing":
            other.setdefault(name, []).append(f"missing required parameter '{name}'")
        elif len(loc) > 1 and not loc[1].isdigit() and ("[" in loc[1] or loc[1] in ("str", "int", "float", "bool")):
            unions.setdefault(top, []).append(loc[1])  # one member of a union type
        else:
            other.setdefault(name, []).append(f"{name or 'body'}: {e.get('msg')}")
    for top, kinds in unions.items():
        other.setdefault(top, []).append(f"{top}: expected one of {' | '.join(dict.fromkeys(kinds))}")
    parts = []
    if unknown:
        parts.append(f"unsupported parameter{'s' * (len(unknown) > 1)}: {', '.join(unknown)} (not part of the "
                     f"OpenAI API magicdec implements); drop {'them' if len(unknown) > 1 else 'it'}")
    parts += [m for ms in other.values() for m in ms]
    param = unknown[0] if unknown else next((k or None for k in other), None)
    return "; ".join(parts) or "invalid request", param


# ---- the app --------------------------------------------------------------------------------------------
def create_app(config: ServerConfig, load: Callable[[], Engine]) -> FastAPI:
    """The server's app; `load` builds the engine (in a thread, once the server listens)."""
    state = ServerState(config, ServerMetrics(config.served_model_name))

    def load_in_background(loop: asyncio.AbstractEventLoop) -> None:
        try:
            delay = float(os.environ.get(LOAD_DELAY_ENV, "0") or 0)
            if delay > 0:
                time.sleep(delay)
            engine = load()
            runner = EngineRunner(engine, loop, state.metrics, config.max_queue, config.log_interval,
                                  on_fatal=config.on_fatal)
            runner.draining = state.draining
            runner.start()
            state.engine, state.runner = engine, runner
            log.info("ready: serving %s (max model length %d)", config.served_model_name, engine.max_model_len)
        except BaseException as e:
            state.load_error = e
            log.error("the model failed to load: %s", e)
            if config.on_fatal is not None:
                config.on_fatal(e)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_in_background, args=(asyncio.get_running_loop(),),
                                  name="magicdec-load", daemon=True)
        loader.start()
        yield
        state.drain()
        if state.runner is not None:
            await state.runner.stop()

    app = FastAPI(title="magicdec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.magicdec = state
    app.add_middleware(Gate, config=config)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        message = str(exc.detail)
        if exc.status_code == 400:  # (FastAPI's: the body is not JSON it can parse)
            message = "the body is not JSON that can be read (bytes that are not UTF-8, or nesting too deep): " \
                      "send a JSON object in UTF-8"
        return JSONResponse(error_body(message, "invalid_request_error", None, kind),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health() -> Response:
        if state.load_error is not None or (state.runner is not None and state.runner.error is not None):
            return JSONResponse({"status": "error"}, status_code=503)
        if state.runner is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine, _ = state.ready()
        name = config.served_model_name
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(state.started),
                                            "owned_by": "magicdec", "root": name, "parent": None,
                                            "max_model_len": engine.max_model_len}]}

    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        """The model a router (the SGLang Model Gateway) registers this server under: its served name."""
        engine, _ = state.ready()
        name = config.served_model_name
        return {"model_path": name, "served_model_name": name, "tp_size": engine.llm.models.tp_world,
                "dp_size": 1, "max_running_requests": engine.core.config.max_num_seqs}

    if config.dev_endpoints:
        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache() -> Response:
            """Forget every cached prefix (benchmarks compare policies on the same prompts); 200 once done."""
            _, runner = state.ready()
            await runner.reset_prefix_cache()
            return Response(status_code=200)

    # (tokenizing is CPU work, a long body's for a while: these run in a worker thread, off the event loop)
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        engine, _ = state.ready()
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad("give exactly one of prompt and messages", "prompt")
        ids = await asyncio.to_thread(tokenize_body, engine, body)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        engine, _ = state.ready()
        state.check_model(body.model)
        vocab = engine.llm.config.vocab_size
        wrong = [t for t in body.tokens if not 0 <= t < vocab]
        if wrong:
            raise bad(f"token ids must be in 0 … {vocab - 1}, got {wrong[:5]}", "tokens")
        return {"prompt": await asyncio.to_thread(engine.llm.tokenizer.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine, runner = state.ready()
        state.check_model(body.model)
        check_common(body)
        texts = completion_prompts(body.prompt)
        check_choices(engine, runner, len(texts), body.n)
        try:  # (off the event loop: a long prompt takes a while to tokenize)
            whole = await asyncio.to_thread(engine.llm.encode, texts)
        except PromptError as e:
            raise bad(str(e), "prompt") from None
        prompts = [truncated(engine, body, ids) for ids in whole]
        echo = None
        if body.echo:  # the prompt as given (as its tokens decode when it was tokens, or was cut)
            echo = [t if isinstance(t, str) and len(ids) == len(w) else engine.llm.tokenizer.decode(ids)
                    for t, ids, w in zip(texts, prompts, whole)]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return await serve(state, engine, runner, body, request, prompts, max_tokens, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        engine, runner = state.ready()
        state.check_model(body.model)
        check_common(body)
        check_choices(engine, runner, 1, body.n)
        tools = await asyncio.to_thread(chat_tools, engine, body)
        ids = await asyncio.to_thread(encode_chat, engine, body.messages, body.tools or None)
        if not ids:
            raise bad("the messages render to an empty prompt", "messages")
        ids = truncated(engine, body, ids)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # up to the context (and what the KV cache holds)
            max_tokens = max(token_limit(engine) - len(ids), 1)
        return await serve(state, engine, runner, body, request, [ids], max_tokens, chat=True, tools=tools)

    return app


def tokenize_body(engine: Engine, body: TokenizeRequest) -> list[int]:
    """/tokenize's token ids: a prompt (with the tokenizer's special tokens unless told otherwise) or chat
    messages (the template writes its own)."""
    tok = engine.llm.tokenizer
    if body.messages is not None:
        if body.tools:
            try:
                check_tools(body.tools, None, None)
            except ToolError as e:
                raise bad(str(e), e.param) from None
        text = render_chat(engine, body.messages, body.add_generation_prompt, body.tools or None)
        return tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
    assert body.prompt is not None
    return tok.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)


def render_chat(engine: Engine, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
    try:
        return engine.llm.tokenizer.apply_chat_template(chat_messages(messages), add_generation_prompt, tools)
    except APIError:
        raise
    except Exception as e:  # the template's own raise_exception, or a template error
        raise bad(f"the chat template cannot render these messages: {e}", "messages") from None


def encode_chat(engine: Engine, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The chat template's prompt as tokens (the template writes the special tokens itself)."""
    return engine.llm.tokenizer.encode(render_chat(engine, messages, True, tools), add_special_tokens=False)


@dataclass
class ChatTools:
    """A chat request's tools: the names its output's calls may have, the grammar tool_choice forces, and
    whether tool_choice names a function (then finish_reason stays the output's, "stop", as OpenAI and vLLM
    answer a forced call; "auto" and "required" calls finish with "tool_calls")."""

    names: set[str]
    grammar: str | None
    named: bool = False

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason != "error" and not self.named else reason


def chat_tools(engine: Engine, body: ChatRequest) -> ChatTools | None:
    """The request's tools checked against the chat template (None: no tools, or tool_choice "none")."""
    try:
        tools, choice = check_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        tok = engine.llm.tokenizer
        if tools and not tok.template_uses_tools:
            raise bad("tools: this model's chat template does not render tools (it never reads `tools`); send the "
                      "tool definitions in a system message instead", "tools")
        if choice == "none":
            return None
        hermes = (tag_expr(OPEN, tok.token_id(OPEN)), tag_expr(CLOSE, tok.token_id(CLOSE))) \
            if uses_hermes(tok.chat_template) else None
        return ChatTools({t.name for t in tools}, tool_grammar(tools, choice, body.parallel_tool_calls is not False,
                                                               hermes), named=choice not in ("auto", "required"))
    except ToolError as e:
        raise bad(str(e), e.param) from None


def truncated(engine: Engine, body: Common, ids: list[int]) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: as many as the context holds)."""
    k = body.truncate_prompt_tokens
    if k is None:
        return ids
    k = engine.max_model_len if k == -1 else k
    return ids[-k:]


def kv_capacity(engine: Engine) -> int:
    """The most tokens (prompt + output) the KV cache holds for one request (`EngineCore.limits`)."""
    return engine.core.limits.kv_capacity


def token_limit(engine: Engine) -> int:
    """The most tokens (prompt + output) one request may take: the context, and what the KV cache holds."""
    return min(engine.max_model_len, kv_capacity(engine))


def check_prompt(engine: Engine, ids: list[int], max_tokens: int, param: str) -> None:
    """A request's length against the engine's limits, in OpenAI's words (`context_length_exceeded`): the
    engine's `check_request` then runs once, before the request is queued."""
    total = len(ids) + max_tokens
    if total > engine.max_model_len:
        raise bad(f"This model's maximum context length is {engine.max_model_len} tokens. However, you requested "
                  f"{total} tokens ({len(ids)} in the {param}, {max_tokens} in the completion). Please reduce the "
                  f"length of the {param} or the completion (max_tokens).", param, "context_length_exceeded")
    if total > kv_capacity(engine):
        raise bad(f"this request needs {total} tokens of KV cache ({len(ids)} in the {param}, {max_tokens} in the "
                  f"completion) but the server's KV cache holds {kv_capacity(engine)} per request: reduce the "
                  f"length of the {param} or the completion (max_tokens)", param, "context_length_exceeded")


def check_choices(engine: Engine, runner: EngineRunner, prompts: int, n: int) -> None:
    """A request's choices (prompts × n engine requests) must fit the server at once, or it never runs."""
    if prompts * n > runner.capacity:
        seqs = engine.core.config.max_num_seqs
        raise bad(f"this request asks for {prompts * n} completions ({prompts} prompt{'s' * (prompts > 1)} × n "
                  f"{n}) but the server holds at most {runner.capacity} at once ({seqs} running, --max-num-seqs, "
                  f"+ {runner.capacity - seqs} queued, --max-queue): lower n or send fewer prompts per request",
                  "n" if n > 1 else "prompt", "too_many_choices")


def build_jobs(engine: Engine, body: Common, prompts: list[list[int]], max_tokens: int, rid: str,
               arrival: float, param: str, grammar: str | None = None) -> list[Job]:
    if max_tokens < 1:
        raise bad(f"max_tokens must be ≥ 1, got {max_tokens}", "max_tokens")
    if body.min_tokens > max_tokens:
        raise bad(f"min_tokens ({body.min_tokens}) must be ≤ max_tokens ({max_tokens})", "min_tokens")
    vocab = engine.llm.config.vocab_size
    for name, ids in (("stop_token_ids", body.stop_token_ids or []), ("logit_bias", map(int, body.logit_bias or {}))):
        if any(not 0 <= t < vocab for t in ids):
            raise bad(f"{name}: token ids must be in 0 … {vocab - 1}", name)
    for ids in prompts:
        check_prompt(engine, ids, max_tokens, param)
    spec = None
    if body.speculation is not None and (body.speculation.gamma is not None or body.speculation.method is not None):
        bound = engine.core.limits.max_gamma
        if body.speculation.gamma is not None and body.speculation.gamma > bound:
            how = (f"at most {bound} (the server's --gamma)" if bound else
                   "0 (this server runs without speculation: start it with --spec self)")
            raise bad(f"speculation.gamma must be {how}, got {body.speculation.gamma}", "speculation.gamma")
        spec = RequestSpec(body.speculation.gamma, body.speculation.method)
    jobs = []
    n = body.n
    for p, ids in enumerate(prompts):
        for j in range(n):
            seed = None if body.seed is None else body.seed + j  # choice j of each prompt: seed + j
            try:
                params = sampling_params(body, max_tokens, seed, grammar)
            except ValueError as e:
                raise bad(str(e)) from None
            if j == 0:  # the engine's own checks, once per prompt, before anything is queued
                try:
                    engine.check_request(ids, params, spec)
                except ValueError as e:
                    raise bad(str(e), "speculation" if spec is not None and "speculation" in str(e) else param) \
                        from None
            jobs.append(Job(f"{rid}-{p * n + j}", ids, params, spec, arrival))
    return jobs


def sampling_params(body: Common, max_tokens: int, seed: int | None, grammar: str | None = None) -> SamplingParams:
    """The engine's sampling parameters of a request body (one choice)."""
    k = body.top_logprobs_k()
    echo = isinstance(body, CompletionRequest) and bool(body.echo)
    # the prompt's: echo's (k alternatives) and vLLM's prompt_logprobs (its own k), the more of the two
    ks = [x for x in (k if echo else None, None if body.stream else body.prompt_logprobs) if x is not None]
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p, seed=seed,
        stop=stop_strings(body.stop), ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias={int(t): b for t, b in (body.logit_bias or {}).items()}, min_p=body.min_p or 0.0,
        min_tokens=body.min_tokens, stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop_str_in_output=body.include_stop_str_in_output or body.no_stop_trim,
        skip_special_tokens=body.skip_special_tokens, logprobs=k, prompt_logprobs=max(ks, default=None),
        grammar=grammar)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class EventStream(StreamingResponse):
    """An SSE response that, however it ends (finished, client gone, cancelled), aborts what is left."""

    def __init__(self, content: AsyncIterator[str], stream: Stream) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.abort()


async def serve(state: ServerState, engine: Engine, runner: EngineRunner, body: Common, request: Request,
                prompts: list[list[int]], max_tokens: int, chat: bool, echo: list[str] | None = None,
                tools: ChatTools | None = None) -> Response:
    arrival = time.monotonic()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    grammar = await asyncio.to_thread(structured_grammar, body)  # (compiling a schema takes a moment)
    if tools is not None and tools.grammar is not None:
        if grammar is not None:
            raise bad("tool_choice 'required' or a named function forces the output's form: drop response_format "
                      "or structured_outputs", "tool_choice")
        grammar = tools.grammar
    jobs = build_jobs(engine, body, prompts, max_tokens, rid, arrival, "messages" if chat else "prompt", grammar)
    try:
        stream = runner.submit(jobs)
    except QueueFull:
        raise APIError(503, f"the server is at capacity ({runner.capacity} requests running or queued, "
                       "--max-queue); retry later", type="server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ShuttingDown:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineDead:
        raise APIError(503, "the engine failed; see the server's log", type="server_error",
                       code="engine_error") from None
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": state.config.served_model_name}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(sse(stream, request, head, prompts, body, chat, include_usage, engine, echo, tools), stream)
    try:
        finals: dict[int, StepOutput] = {}
        async for index, out in stream.outputs(request):
            if out.finished:
                finals[index] = out
    except ClientGone:
        return Response(status_code=499)
    finally:
        stream.abort()
    outs = [finals[i] for i in range(len(jobs))]
    failed = next((out for out in outs if out.finish_reason == "error"), None)
    if failed is not None:
        raise request_error(output_error(failed))
    choices = []
    tok = engine.llm.tokenizer
    for i, out in enumerate(outs):
        choice: dict[str, Any] = {"index": i}
        prefix = echo[i // body.n] if echo is not None else ""
        logprobs = None
        finish = out.finish_reason
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
            if tools is not None:
                content, calls = parse_tool_calls(out.text, tools.names)
                choice["message"]["content"] = content
                if calls:
                    choice["message"]["tool_calls"] = calls
                finish = tools.finish_reason(finish, bool(calls))
            if out.logprobs is not None:
                logprobs = chat_logprobs(tok, out.logprobs)
        else:
            choice["text"] = prefix + out.text
            if out.logprobs is not None:
                logprobs = completion_logprobs(tok, out.logprobs, out.token_ids, len(prefix))
                if echo is not None and out.prompt_logprobs is not None:
                    k = body.top_logprobs_k() or 0
                    echoed = [None if lp is None else lp.keep(k) for lp in out.prompt_logprobs]
                    logprobs = join(completion_logprobs(tok, echoed, out.prompt_token_ids), logprobs)
        choice.update(logprobs=logprobs, finish_reason=finish, stop_reason=None)
        if body.return_token_ids:
            choice.update(prompt_token_ids=out.prompt_token_ids, token_ids=out.token_ids)
        if not chat and body.prompt_logprobs is not None and out.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs(tok, out.prompt_logprobs, body.prompt_logprobs)
        choices.append(choice)
    answer = {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
              "usage": usage_of(prompts, body.n, outs)}
    if chat and body.prompt_logprobs is not None and outs[0].prompt_logprobs is not None:  # (vLLM's place)
        answer["prompt_logprobs"] = prompt_logprobs(tok, outs[0].prompt_logprobs, body.prompt_logprobs)
    return JSONResponse(answer)


def usage_of(prompts: list[list[int]], n: int, outs: list[StepOutput]) -> dict[str, Any]:
    cached = sum(outs[p * n].metrics.cached_tokens for p in range(len(prompts)))
    return usage([len(p) for p in prompts], cached, outs)


async def sse(stream: Stream, request: Request, head: dict[str, Any], prompts: list[list[int]], body: Common,
              chat: bool, include_usage: bool, engine: Engine, echo: list[str] | None = None,
              tools: ChatTools | None = None) -> AsyncIterator[str]:
    """OpenAI's stream: chat opens each choice with a role delta; deltas carry finish_reason null until a
    choice's last one; then (stream_options.include_usage) a usage chunk with no choices; then [DONE]. With
    vLLM's stream_options.continuous_usage_stats every chunk carries the usage so far. Echo: a choice's first
    text chunk starts with its prompt (and its log-probabilities). A choice the engine failed on ends the
    stream: its chunk with finish_reason "error", an error event (`data: {"error": …}`, which OpenAI's
    clients raise), then [DONE]. With tools, text that may start a tool call is held back, and each call is
    sent whole once its text is complete (`delta.tool_calls`, with its index among the choice's calls)."""
    tok = engine.llm.tokenizer
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats
    n_choices = len(stream.request_ids)
    prompt_tokens = sum(len(p) for p in prompts)
    produced = [0] * n_choices  # output tokens per choice so far
    offsets = [0] * n_choices  # completions' text_offset so far, per choice
    echoed: set[int] = set()
    wants_logprobs = body.top_logprobs_k() is not None
    parsers = [ToolStream(tools.names) for _ in range(n_choices)] if tools is not None else None

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        out = {**head, "choices": choices, **extra}
        if continuous and "usage" not in extra:
            done = sum(produced)
            out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                            "total_tokens": prompt_tokens + done}
        elif include_usage and "usage" not in extra:
            out["usage"] = None
        return f"data: {dumps(out)}\n\n"

    finals: dict[int, StepOutput] = {}
    try:
        if chat:
            for i in range(n_choices):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        async for index, out in stream.outputs(request):
            produced[index] = out.num_tokens
            first = echo is not None and index not in echoed and bool(out.new_token_ids or out.finished)
            if out.finished:
                finals[index] = out
            elif not (out.new_text or first or (out.new_token_ids and (body.return_token_ids or wants_logprobs))):
                continue
            choice: dict[str, Any] = {"index": index}
            logprobs = None
            finish = out.finish_reason if out.finished else None
            if chat and parsers is not None and tools is not None:
                parser = parsers[index]
                sent = len(parser.calls)
                text, calls = parser.feed(out.new_text)
                if out.finished:
                    more, last = parser.finish()
                    text, calls = text + more, calls + last
                    finish = tools.finish_reason(finish, bool(parser.calls))
                choice["delta"] = {"content": text} if text else {}
                if calls:
                    choice["delta"]["tool_calls"] = [{"index": sent + k, **c} for k, c in enumerate(calls)]
                if not (choice["delta"] or out.finished or wants_logprobs or body.return_token_ids):
                    continue
                if wants_logprobs:
                    logprobs = chat_logprobs(tok, out.new_logprobs or [])
            elif chat:
                choice["delta"] = {"content": out.new_text} if out.new_text or not out.finished else {}
                if wants_logprobs:
                    logprobs = chat_logprobs(tok, out.new_logprobs or [])
            else:
                prefix = ""
                if first:
                    assert echo is not None
                    prefix = echo[index // body.n]
                    echoed.add(index)
                    if wants_logprobs and out.prompt_logprobs is not None:
                        logprobs = completion_logprobs(tok, out.prompt_logprobs, out.prompt_token_ids)
                        offsets[index] = len(prefix)
                choice["text"] = prefix + out.new_text
                if wants_logprobs:
                    mine = completion_logprobs(tok, out.new_logprobs or [], out.new_token_ids, offsets[index])
                    offsets[index] += sum(len(t) for t in mine["tokens"])
                    logprobs = join(logprobs, mine)
            choice.update(logprobs=logprobs, finish_reason=finish)
            if body.return_token_ids:
                choice["token_ids"] = out.new_token_ids
            yield chunk([choice])
            if out.finish_reason == "error":  # this choice failed: the stream ends with the error (vLLM's way)
                raise request_error(output_error(out))
        if include_usage:
            outs = [finals[i] for i in range(n_choices)]
            yield chunk([], usage=usage_of(prompts, body.n, outs))
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
    except APIError as e:
        yield f"data: {dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
