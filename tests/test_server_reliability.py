"""The server when something goes wrong: one request's failure isolated from the engine, the limits that
keep a request from costing everyone (choices, stop strings, a slow reader's memory, tokenizing off the
event loop), and the protocol's corners (nulls, logprobs' types, the Bearer scheme).

The server is the app `magicdec serve` builds, under uvicorn in this process (`app_server`), over an engine
on a small random checkpoint with a chat template."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app_server import MODEL, AppServer, chat_checkpoint
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.engine.outputs import StepOutput
from magicdec.server.protocol import MAX_STOP, MAX_STOP_CHARS
from magicdec.server.runner import EngineRunner, Job

POISON = 383  # a prompt starting with this token fails in the engine (`fail_requests`)
ENGINE = dict(max_num_seqs=2, max_num_batched_tokens=256, prefill_chunk=128, num_blocks=64, quiet=True)


def fail_requests(engine: Engine, poison: int = POISON, everything: bool = False) -> None:
    """Wrap a real engine's `step`: a request whose prompt starts with `poison` fails after its first tokens,
    reported as the engine reports a failed request (aborted, one final output with finish_reason "error"
    and its message); with `everything`, `step` raises instead (an engine-wide fault)."""
    step = engine.step
    failed: set[str] = set()
    message = {"error": "injected failure"} if "error" in StepOutput.__dataclass_fields__ else {}

    def faulty() -> list[StepOutput]:
        outs = []
        for o in step():
            if o.request_id in failed:  # its abort, already reported as the failure
                continue
            if o.prompt_token_ids[0] == poison and not o.finished:
                if everything:
                    raise RuntimeError("injected engine fault")
                engine.abort_request(o.request_id)
                failed.add(o.request_id)
                o = replace(o, finished=True, finish_reason="error", **message)
            outs.append(o)
        return outs

    engine.step = faulty  # type: ignore[method-assign]


def error_of(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse(r: httpx.Response) -> list[Any]:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in r.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return LLM(chat_checkpoint(tmp_path_factory.mktemp("tiny-chat")), device="cpu")


@pytest.fixture(scope="module")
def app(chat_llm: LLM) -> Iterator[AppServer]:
    """An API key, two running requests and two queued at most; prompts starting with POISON fail."""

    def load() -> Engine:
        engine = Engine(llm=chat_llm, **ENGINE)  # type: ignore[arg-type]
        fail_requests(engine)
        return engine

    with AppServer(load, api_key="sekret", max_queue=2) as server:
        yield server


def prompt(*words: int) -> str:
    return " ".join(f"w{w}" for w in words)


# ---- #1: a request's failure is its own ----------------------------------------------------------------
def test_a_failed_request_is_its_own_500_and_the_server_goes_on(app: AppServer) -> None:
    poisoned = {"prompt": prompt(POISON, 5, 6), "max_tokens": 8, "ignore_eos": True, "temperature": 0}
    err = error_of(app.post("/v1/completions", poisoned), 500, code="engine_error")
    assert err["type"] == "server_error" and "failed on this request" in err["message"]
    if "error" in StepOutput.__dataclass_fields__:
        assert "injected failure" in err["message"]
    # streaming: the choice's last chunk says "error", then an error event, then [DONE]
    with httpx.stream("POST", f"{app.url}/v1/completions", json={**poisoned, "stream": True}, headers=app.headers,
                      timeout=60) as r:
        assert r.status_code == 200
        events = sse(r)
    *chunks, error, done = events
    assert done == "[DONE]" and error["error"]["code"] == "engine_error"
    assert chunks[-1]["choices"][0]["finish_reason"] == "error"
    # the OpenAI client raises on the error event
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="sekret", max_retries=0)
    with pytest.raises(openai.APIError, match="failed on this request"):
        for _ in client.completions.create(model=MODEL, prompt=poisoned["prompt"], max_tokens=8, stream=True,
                                           extra_body={"ignore_eos": True}):
            pass
    # one of two choices failing fails the request; the server and its engine go on
    two = app.post("/v1/completions", {**poisoned, "prompt": [prompt(POISON, 5), prompt(7, 8)]})
    error_of(two, 500, code="engine_error")
    assert app.healthy() and app.state.runner is not None and app.state.runner.error is None and not app.fatal
    ok = app.post("/v1/completions", {"prompt": prompt(5, 6), "max_tokens": 4, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    m = httpx.get(f"{app.url}/metrics", headers=app.headers).text
    assert 'vllm:request_success_total{finished_reason="error",model_name="tiny"} 4.0' in m
    assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.0' in m  # the failed requests' blocks are free


def test_a_tiny_temperature_is_served(chat_llm: LLM) -> None:
    """temperature 1e-45 overflowed logits / T and crashed the engine thread (the server exited): it is
    greedy now, a 200 equal to temperature 0, and the server stays healthy. (The engine's fix.)"""
    with AppServer(lambda: Engine(llm=chat_llm, **ENGINE)) as app:  # type: ignore[arg-type]
        body = {"prompt": prompt(11, 12, 13), "max_tokens": 6, "ignore_eos": True, "return_token_ids": True}
        tiny = app.post("/v1/completions", {**body, "temperature": 1e-45})
        assert tiny.status_code == 200, tiny.text
        greedy = app.post("/v1/completions", {**body, "temperature": 0})
        assert tiny.json()["choices"][0]["token_ids"] == greedy.json()["choices"][0]["token_ids"]
        assert app.healthy() and not app.fatal


def test_an_engine_fault_stops_the_server(chat_llm: LLM) -> None:
    """`step()` raising is engine-wide: the request in flight gets a 500, /health turns 503, on_fatal runs."""

    def load() -> Engine:
        engine = Engine(llm=chat_llm, **ENGINE)  # type: ignore[arg-type]
        fail_requests(engine, everything=True)
        return engine

    with AppServer(load) as server:
        r = server.post("/v1/completions", {"prompt": prompt(POISON, 5), "max_tokens": 4})
        error_of(r, 500, code="engine_error")
        assert not server.healthy() and len(server.fatal) == 1
        error_of(server.post("/v1/completions", {"prompt": prompt(5), "max_tokens": 4}), 503, code="engine_error")


# ---- #7: chat without max_tokens counts SnapKV's kept blocks ------------------------------------------
def test_chat_without_max_tokens_fits_a_snapkv_pool(chat_llm: LLM) -> None:
    """A pool smaller than the context: chat's default max_tokens is what the pool holds for one request,
    less the blocks a SnapKV draft keeps beside it (it was not counted: a 400 misstating the capacity)."""
    spec = SpecConfig(method="self", drafter="snapkv", budget=128, gamma=2)  # 64 selected: one kept block

    def load() -> Engine:
        return Engine(llm=chat_llm, spec=spec, **{**ENGINE, "num_blocks": 5})  # type: ignore[arg-type]

    with AppServer(load) as server:
        core = server.engine.core
        assert core.scheduler.config.kept_blocks == 1 and server.engine.max_model_len > 5 * 64
        capacity = (5 - 1) * 64 - core.scheduler.lookahead
        messages = [{"role": "user", "content": prompt(20, 21, 22, 23)}]
        r = server.post("/v1/chat/completions", {"messages": messages, "ignore_eos": True})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == capacity
        over = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": capacity})
        assert f"holds {capacity} per request" in error_of(over, 400, "messages", "context_length_exceeded")["message"]


# ---- #11: more choices than the server holds ----------------------------------------------------------
def test_more_choices_than_the_server_holds_is_400(app: AppServer) -> None:
    capacity = 2 + 2  # max_num_seqs + max_queue
    err = error_of(app.post("/v1/completions", {"prompt": prompt(5), "max_tokens": 2, "n": capacity + 1}), 400,
                   "n", "too_many_choices")
    assert f"at most {capacity}" in err["message"] and "--max-queue" in err["message"]
    many = [prompt(5, i) for i in range(3)]
    error_of(app.post("/v1/completions", {"prompt": many, "max_tokens": 2, "n": 2}), 400, "n", "too_many_choices")
    error_of(app.post("/v1/completions", {"prompt": [prompt(i) for i in range(5)], "max_tokens": 2}), 400, "prompt",
             "too_many_choices")
    error_of(app.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "n": 5}), 400, "n")
    ok = app.post("/v1/completions", {"prompt": prompt(5), "max_tokens": 2, "n": capacity, "ignore_eos": True})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == capacity


# ---- #16: stop strings are capped ----------------------------------------------------------------------
def test_stop_strings_are_capped(app: AppServer) -> None:
    body = {"prompt": prompt(5), "max_tokens": 2}
    err = error_of(app.post("/v1/completions", {**body, "stop": [f"w{i}x" for i in range(MAX_STOP + 1)]}), 400,
                   "stop")
    assert f"at most {MAX_STOP}" in err["message"]
    err = error_of(app.post("/v1/completions", {**body, "stop": "x" * (MAX_STOP_CHARS + 1)}), 400, "stop")
    assert str(MAX_STOP_CHARS) in err["message"]
    ok = app.post("/v1/completions", {**body, "stop": ["y" * MAX_STOP_CHARS] + ["z"] * (MAX_STOP - 1)})
    assert ok.status_code == 200, ok.text


# ---- #17: protocol details -----------------------------------------------------------------------------
def test_explicit_nulls_are_defaults(app: AppServer) -> None:
    nulls = {k: None for k in ("n", "stream", "ignore_eos", "return_token_ids", "max_tokens", "temperature", "top_p",
                               "top_k", "seed", "stop", "stream_options", "user", "speculation", "logprobs", "echo",
                               "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "best_of", "model")}
    r = app.post("/v1/completions", {"prompt": prompt(5, 6), **nulls})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["object"] == "text_completion"
    chat = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 3, "n": None, "stream": None,
            "ignore_eos": None, "max_completion_tokens": None, "tools": None, "tool_choice": None,
            "response_format": None, "top_logprobs": None, "parallel_tool_calls": None}
    assert app.post("/v1/chat/completions", chat).status_code == 200
    tok = app.post("/tokenize", {"prompt": "w5", "add_special_tokens": None, "add_generation_prompt": None})
    assert tok.status_code == 200, tok.text
    error_of(app.post("/v1/completions", {"prompt": None}), 400, "prompt")  # a required one stays required


def test_logprobs_types_are_checked(app: AppServer) -> None:
    """Completions take an integer number of alternatives (0 … 20), chat a boolean (and top_logprobs)."""
    for value in (True, -1, 21, "2"):
        err = error_of(app.post("/v1/completions", {"prompt": prompt(5), "max_tokens": 2, "logprobs": value}), 400,
                       "logprobs")
        assert "logprobs" in err["message"]
    for value in (0, 1, 5):
        r = app.post("/v1/completions", {"prompt": prompt(5), "max_tokens": 2, "logprobs": value})
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 2, r.text
    chat = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}
    for value in (0, 1):
        error_of(app.post("/v1/chat/completions", {**chat, "logprobs": value}), 400, "logprobs")
    for body in ({"prompt": prompt(5), "max_tokens": 2, "logprobs": None},
                 {**chat, "logprobs": False}, {**chat, "logprobs": False, "top_logprobs": 0},
                 {**chat, "logprobs": True, "top_logprobs": 3}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert app.post(path, body).status_code == 200


def test_bearer_scheme_is_case_insensitive_and_the_key_exact(app: AppServer) -> None:
    def models(auth: str | None) -> int:
        headers = {"Authorization": auth} if auth is not None else {}
        return httpx.get(f"{app.url}/v1/models", headers=headers, timeout=10).status_code

    for auth in ("Bearer sekret", "bearer sekret", "BEARER sekret", "bEaReR sekret"):
        assert models(auth) == 200, auth
    for auth in (None, "", "sekret", "Bearer Sekret", "Bearer sekret2", "Bearer  sekret", "Basic sekret",
                 "Bearersekret", "Token sekret", "Bearer"):
        assert models(auth) == 401, auth


# ---- #18: tokenizing runs off the event loop ----------------------------------------------------------
def test_tokenize_and_detokenize_run_off_the_event_loop(app: AppServer) -> None:
    """The tokenizer is called from a worker thread, never the event loop's (a 1 MiB body would stall every
    connection while it is tokenized)."""
    tok = app.engine.llm.tokenizer
    seen: list[str] = []
    encode, decode = tok.encode, tok.decode

    def spy(fn: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            seen.append(threading.current_thread().name)
            return fn(*args, **kw)
        return call

    tok.encode, tok.decode = spy(encode), spy(decode)  # type: ignore[method-assign]
    try:
        big = " ".join(["w7"] * 100_000)
        r = app.post("/tokenize", {"prompt": big})
        assert r.status_code == 200 and r.json()["count"] == 100_000
        assert app.post("/tokenize", {"messages": [{"role": "user", "content": "w5"}]}).status_code == 200
        assert app.post("/detokenize", {"tokens": [5, 6, 7]}).json() == {"prompt": "w5 w6 w7"}
    finally:
        tok.encode, tok.decode = encode, decode  # type: ignore[method-assign]
    assert len(seen) == 3 and "test-uvicorn" not in seen, seen  # (uvicorn's event loop runs in that thread)


# ---- #15: a slow reader costs O(output) -----------------------------------------------------------------
def test_a_reader_that_falls_behind_costs_linear_memory(chat_llm: LLM) -> None:
    """A stream nobody reads until its request has finished holds one pending entry per choice, whose
    tokens are the output once (the old queue held one entry per step, each a copy of everything so far:
    O(output²))."""
    n = 600
    engine = Engine(llm=chat_llm, **ENGINE)  # type: ignore[arg-type]

    async def run() -> tuple[int, list[int]]:
        runner = EngineRunner(engine, asyncio.get_running_loop(), max_queue=2)
        runner.start()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            params = SamplingParams(max_new_tokens=n, ignore_eos=True)
            stream = runner.submit([Job("slow", [5, 6, 7], params, None, time.monotonic())])
            while runner.outstanding:  # (the engine thread counts it free before delivering it)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # its last outputs reach the stream
            held = tracemalloc.get_traced_memory()[0] - before
            assert len(stream.pending) == 1
            ids: list[int] = []
            async for _, out in stream.outputs():
                ids += out.new_token_ids
            assert out.finished and len(ids) == n
            return held, ids
        finally:
            tracemalloc.stop()
            await runner.stop()

    held, ids = asyncio.run(run())
    want = Engine(llm=chat_llm, **ENGINE).run([[5, 6, 7]], SamplingParams(max_new_tokens=n, ignore_eos=True))  # type: ignore[arg-type]
    assert ids == want[0].token_ids
    assert held < 400 * n, f"{held} bytes held for {n} output tokens"


def test_a_slow_sse_reader_still_gets_every_token(app: AppServer) -> None:
    """An SSE client that reads nothing until the request has finished gets all of it, in order."""
    body = {"prompt": prompt(9, 10), "max_tokens": 300, "ignore_eos": True, "stream": True, "return_token_ids": True,
            "temperature": 0}
    with httpx.stream("POST", f"{app.url}/v1/completions", json=body, headers=app.headers, timeout=120) as r:
        runner, deadline = app.state.runner, time.monotonic() + 60
        assert runner is not None
        while runner.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        events = sse(r)
    ids = [t for e in events[:-1] for t in e["choices"][0]["token_ids"]]
    whole = app.post("/v1/completions", {**body, "stream": False}).json()["choices"][0]["token_ids"]
    assert ids == whole and len(ids) == 300 and events[-1] == "[DONE]"


def test_chat_template_sandbox_refuses_python_internals(tmp_path: Path) -> None:
    """A chat template that reaches for Python's internals is refused with a clear error, never run."""
    from magicdec.loading.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(chat_checkpoint(tmp_path / "t"))
    messages = [{"role": "user", "content": "w5"}]
    assert tok.apply_chat_template(messages) == "user w5 w2 assistant"
    for template in ("{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}",
                     "{{ raise_exception.__globals__['__builtins__'] }}", "{% set _ = messages.append(1) %}",
                     "{{ messages.__class__.__subclasses__() }}"):
        tok.chat_template = template
        with pytest.raises(ValueError, match="unsafe"):
            tok.apply_chat_template(messages)
