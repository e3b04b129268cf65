"""The server under a storm of requests: hundreds generated from its own OpenAPI schema (schemathesis, inside
the schema and outside it), then hand-written hostile ones (odd numbers, NaN, nulls, wrong types, deep
JSON, lone surrogates, bad UTF-8, long stop lists, 1 MiB bodies, huge n). Every answer is a 2xx or an error
in OpenAI's shape, never a 5xx (but a request's own engine error, a 500 for it alone); afterwards the
server is healthy, holds no KV block, and a greedy request still equals offline generation token for token.

The generated requests are bounded (max_tokens ≤ 8 inside the schema, a server context of 128 tokens) so
the storm takes about a minute; MAGICDEC_FUZZ_EXAMPLES asks for more (and MAGICDEC_FUZZ_SEED for another
draw than the suite's fixed one)."""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from app_server import MODEL, AppServer, chat_checkpoint
from magicdec import LLM, Engine, SamplingParams, SpecConfig

EXAMPLES = int(os.environ.get("MAGICDEC_FUZZ_EXAMPLES", "520"))
SEED = int(os.environ.get("MAGICDEC_FUZZ_SEED", "23"))
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return LLM(chat_checkpoint(tmp_path_factory.mktemp("tiny-chat")), device="cpu")


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[AppServer]:
    spec = SpecConfig(method="self", budget=32, sinks=4, gamma=2)

    def load() -> Engine:
        return Engine(llm=llm, spec=spec, max_num_seqs=4, max_num_batched_tokens=128, prefill_chunk=64,
                      num_blocks=32, max_model_len=MAX_MODEL_LEN, quiet=True)

    with AppServer(load, max_queue=4) as s:
        yield s


def bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """The server's schema, narrowed where it says less than the server accepts (so that most requests
    generated inside it are served, not refused: the engine runs them) and bounded where a request would
    generate for long (a few output tokens, few choices, few prompts). Requests generated outside it (the
    negative half) still reach every refusal."""
    schema = copy.deepcopy(schema)
    parts = schema["components"]["schemas"]
    message = {"type": "object", "additionalProperties": False, "required": ["role", "content"],
               "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                              "content": {"type": "string", "maxLength": 40}}}
    messages = {"type": "array", "items": message, "minItems": 1, "maxItems": 3}
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 383}, "minItems": 1,
                 "maxItems": 40}
    narrower = {
        "model": {"enum": [MODEL]}, "max_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
        "n": {"type": "integer", "minimum": 1, "maximum": 3},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": 1000},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63},
        "stop": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 8}, "maxItems": 4},
        "speculation": {"type": "object", "properties": {"gamma": {"type": "integer", "minimum": 0, "maximum": 2}},
                        "additionalProperties": False},
        "presence_penalty": {"const": 0}, "frequency_penalty": {"const": 0}, "logit_bias": {"const": {}},
        "logprobs": {"const": False}, "echo": {"const": False}, "suffix": {"const": ""}, "best_of": {"const": 1},
        "top_logprobs": {"const": 0}, "response_format": {"const": {"type": "text"}}, "tools": {"const": []},
        "tool_choice": {"const": "none"}, "messages": messages, "tokens": token_ids,
        "prompt": {"anyOf": [{"type": "string", "maxLength": 200}, token_ids,
                             {"type": "array", "items": {"type": "string", "maxLength": 50}, "minItems": 1,
                              "maxItems": 2},
                             {"type": "array", "items": token_ids, "minItems": 1, "maxItems": 2}]},
    }
    parts["ChatRequest"]["required"].append("max_tokens")  # (without it, a chat generates to the context)
    for name in ("CompletionRequest", "ChatRequest", "TokenizeRequest", "DetokenizeRequest"):
        props = parts[name]["properties"]
        for field, narrow in narrower.items():
            if field in props:
                props[field] = narrow if field in parts[name].get("required", ()) else {"anyOf": [narrow,
                                                                                                  {"type": "null"}]}
    return schema


def own_error(error: dict[str, Any]) -> bool:
    """The engine failed on this request alone (its 500, or its stream's error event)."""
    return error["code"] == "engine_error" and "failed on this request" in error["message"]


def check_answer(status: int, content_type: str, text: str, what: str) -> None:
    """A 2xx, or a 4xx in OpenAI's error shape; never a 5xx but a request's own engine error (the server's
    health is checked after the storm)."""
    if status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, \
            f"{what}: {text[:500]}"
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], what
        assert status < 500 or (status == 500 and own_error(body["error"])), f"{what}: {status} {text[:500]}"
        return
    if content_type.startswith("text/event-stream"):
        lines = [x for x in text.split("\n") if x]
        assert lines and lines[-1] == "data: [DONE]", f"{what}: {text[-500:]}"
        for line in lines[:-1]:
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event or own_error(event["error"]), f"{what}: {line}"


def assert_alive(server: AppServer) -> None:
    runner = server.state.runner
    assert runner is not None and runner.error is None and not server.fatal, server.fatal
    assert server.healthy()


def test_generated_requests(server: AppServer) -> None:
    schema = schemathesis.openapi.from_dict(bounded(server.app.openapi()))
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    sent: list[str] = []
    session = requests.Session()

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def one(case: Any) -> None:
        r = case.call(base_url=server.url, session=session, timeout=120)
        sent.append(f"{case.method} {case.path} {r.status_code}")
        content_type = r.headers.get("content-type", [""])
        check_answer(r.status_code, content_type[0] if isinstance(content_type, list) else content_type,
                     r.content.decode(errors="replace"), f"{case.method} {case.path} {case.body!r:.300}")

    try:
        one()
    finally:
        session.close()
    assert len(sent) >= min(EXAMPLES, 500), len(sent)
    served = {s for s in sent if s.endswith(" 200")}  # the engine ran some of them
    assert {"POST /v1/completions 200", "POST /v1/chat/completions 200", "POST /tokenize 200"} <= served, sent
    assert_alive(server)


def hostile() -> Iterator[tuple[str, str, bytes | Any]]:
    """(method, path, body): a JSON value, or raw bytes."""
    chat = "/v1/chat/completions"
    msg = [{"role": "user", "content": "w5"}]
    for path, base in (("/v1/completions", {"prompt": "w5 w6"}), (chat, {"messages": msg})):
        for field in ("max_tokens", "n", "top_k", "seed", "temperature", "top_p"):
            for value in (10**30, -(10**30), 2**63, 2**64, -1, 0, 1e308, 5e-324, 1e-45, -0.0, 3.5, True, "7", [],
                          {}, None):
                yield "POST", path, {**base, field: value, "max_tokens": 2} if field != "max_tokens" else \
                    {**base, field: value}
        for value in ("NaN", "Infinity", "-Infinity", "1e999"):  # (Python's JSON extensions, and an overflow)
            for field in ("temperature", "top_p", "presence_penalty", "max_tokens", "n"):
                yield "POST", path, json.dumps({**base, "max_tokens": 2}).replace("}", f', "{field}": {value}}}', 1
                                                                                   ).encode()
        yield "POST", path, {**base, "stop": ["w7"] * 1000, "max_tokens": 2}
        yield "POST", path, {**base, "stop": "x" * 100_000, "max_tokens": 2}
        yield "POST", path, {**base, "stop": [None, 3], "max_tokens": 2}
        yield "POST", path, {**base, "n": 10**6, "max_tokens": 2}
        yield "POST", path, {**base, "n": 9, "max_tokens": 2}
        yield "POST", path, {**base, "max_tokens": -5}
        yield "POST", path, {**base, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
        yield "POST", path, {**base, "stream": "yes"}
        yield "POST", path, {**base, "speculation": {"gamma": 10**9}, "max_tokens": 2}
        yield "POST", path, {**base, "speculation": {"gamma": 1}, "max_tokens": 2, "stream": True}
        yield "POST", path, {**base, "logit_bias": {"5": float("inf")}}
        yield "POST", path, {**base, "model": "\ud800"}
        yield "POST", path, json.dumps({**base, "max_tokens": 2, "user": "\ud800\udfff\ud83d"}).encode()
        yield "POST", path, b"[" * 100_000 + b"]" * 100_000
        yield "POST", path, b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b', "messages": 1}'
        yield "POST", path, b'{"prompt": "\xff\xfe w5", "messages": "\xc3("}'
        yield "POST", path, b'{"prompt": "w5"'
        yield "POST", path, b""
        yield "POST", path, b"null"
        yield "POST", path, b"[]"
        yield "POST", path, b'"w5"'
        yield "POST", path, b"1e999999"
        yield "POST", path, json.dumps({**base, "pad": "x" * ((1 << 20) - 64)}).encode()[: (1 << 20)]
        yield "POST", path, json.dumps({**base, "pad": "x" * (1 << 20)}).encode()
    big = " ".join(["w9"] * 170_000)  # just under 1 MiB
    yield "POST", "/v1/completions", {"prompt": big, "max_tokens": 2}
    yield "POST", "/v1/completions", {"prompt": [big[:1000]] * 500, "max_tokens": 2}
    yield "POST", "/v1/completions", {"prompt": [[5] * 100] * 500, "max_tokens": 2}
    yield "POST", "/v1/completions", {"prompt": [[5, 6], [-1]], "max_tokens": 2}
    yield "POST", "/v1/completions", {"prompt": [[5, 6], [2**70]], "max_tokens": 2}
    yield "POST", "/v1/completions", {"prompt": [[5, 6], "w5"], "max_tokens": 2}
    yield "POST", "/v1/completions", {"prompt": "\U0001f600" * 50 + "\u202e\u0000\ufeff", "max_tokens": 2}
    yield "POST", "/v1/completions", {"prompt": "w5", "max_tokens": 2, "stop": ["\U0001f600", "\x00"]}
    yield "POST", chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": "w5"}] * 3}]}
    yield "POST", chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}
    yield "POST", chat, {"messages": [{"role": "user", "content": None}]}
    yield "POST", chat, {"messages": [{"role": {"x": 1}, "content": "w5"}]}
    yield "POST", chat, {"messages": [[1, 2]]}
    yield "POST", chat, {"messages": [{"role": "user", "content": "w5", "tool_calls": []}]}
    yield "POST", chat, {"messages": [{"role": "user", "content": "w5 " * 1000}]}
    yield "POST", chat, {"messages": [{"role": "user", "content": "w5"}] * 10_000, "max_tokens": 1}
    yield "POST", "/tokenize", {"prompt": big}
    yield "POST", "/tokenize", {"prompt": "w5", "messages": msg}
    yield "POST", "/tokenize", {}
    yield "POST", "/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}
    yield "POST", "/detokenize", {"tokens": [2**70, -1]}
    yield "POST", "/detokenize", {"tokens": [5] * 100_000}
    yield "POST", "/detokenize", {"tokens": "w5"}
    yield "GET", "/v1/completions", None
    yield "DELETE", "/v1/models", None
    yield "POST", "/v1/embeddings", {"input": "w5"}
    yield "GET", "/v1/models/../../etc/passwd", None


def test_hostile_requests(server: AppServer) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for i, (method, path, body) in enumerate(hostile()):
            if body is None:
                r = c.request(method, path)
            else:  # (Python's JSON: NaN and Infinity as they are, lone surrogates escaped)
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = c.request(method, path, content=content, headers={"content-type": "application/json"})
            what = f"#{i} {method} {path} {body!r:.200}"
            check_answer(r.status_code, r.headers.get("content-type", ""), r.text, what)
    assert_alive(server)


def test_after_the_storm_greedy_equals_offline(server: AppServer, llm: LLM) -> None:
    """Runs after the fuzzers (file order): nothing is left running or holding KV blocks, and a short greedy
    request still equals offline generation token for token."""
    text = "w11 w12 w13 w14 w15"
    r = server.post("/v1/completions", {"prompt": text, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                                         "return_token_ids": True})
    assert r.status_code == 200, r.text
    want = llm.generate([text], SamplingParams(max_new_tokens=12, ignore_eos=True)).outputs[0].token_ids
    assert r.json()["choices"][0]["token_ids"] == want
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in metrics
    assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.0' in metrics
    assert not math.isnan(server.engine.kv_cache_usage)
    assert_alive(server)
