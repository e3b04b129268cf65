"""`magicdec serve` as a client sees it: the real `openai` client (and raw HTTP where the bytes matter)
against the server started as a subprocess on a free port, stopped with SIGTERM (exit status 0).

One server on the built-in SmolLM2 with self-speculation serves most tests; a small one with an API key
and no queue (`--max-num-seqs 1 --max-queue 0`) serves the key and capacity tests; a third one is shut down
while it streams. MAGICDEC_SERVE_LOAD_DELAY holds the model's loading back a moment so that /health's 503
while loading is observable."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from magicdec import LLM, SamplingParams

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the built-in model's served name (its file's stem)
ENGINE = ["--device", "cpu", "--max-num-batched-tokens", "512", "--prefill-chunk", "256", "--num-blocks", "128"]
PROMPTS = ["It is a truth universally acknowledged", "The capital of France is", "Once upon a time, there",
           "def fibonacci(n):", "The quick brown fox", "In 1815, the Battle of", "My favourite food is",
           "Water boils at a temperature of"]


class ServerProcess:
    """`magicdec serve` in a subprocess, its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None,
                 launcher: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.health: list[int] = []  # /health's answers while starting
        environ = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
        command = [*(launcher or [sys.executable]), "-m", "magicdec", "serve", "--port", str(self.port), *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environ)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    r = c.get("/health")
                    self.health.append(r.status_code)
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        pytest.fail(f"the server was not ready within {timeout} s:\n{self.tail()}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def started(tmp: Path, name: str, args: list[str], env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(args, tmp / f"{name}.log", env)
    try:
        server.wait_ready()
        yield server
    finally:
        rc = server.stop()
    assert rc == 0, f"the server exited with {rc} after SIGTERM:\n{server.tail()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*ENGINE, "--max-num-seqs", "8", "--spec", "self", "--budget", "128", "--gamma", "2"]
    yield from started(tmp_path_factory.mktemp("serve"), "main", args, {"MAGICDEC_SERVE_LOAD_DELAY": "1"})


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An API key, one running request at most and no queue."""
    args = [*ENGINE, "--max-num-seqs", "1", "--max-queue", "0", "--api-key", "sekret"]
    yield from started(tmp_path_factory.mktemp("serve"), "guarded", args)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def post(server: ServerProcess, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, **{"timeout": 120, **kw})


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None,
                 says: str = "") -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and says in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(r: httpx.Response) -> list[Any]:
    """The `data:` payloads of an SSE response, JSON-decoded ([DONE] kept as the string)."""
    out = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def metrics(server: ServerProcess, headers: dict[str, str] | None = None
            ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_idle(server: ServerProcess, timeout: float = 10, headers: dict[str, str] | None = None) -> dict[Any, float]:
    """Poll /metrics until nothing runs and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server, headers)
        if m[("vllm:num_requests_running", ())] == 0 and m[("vllm:kv_cache_usage_perc", ())] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy: {m[('vllm:num_requests_running', ())]} running, " \
                                            f"KV usage {m[('vllm:kv_cache_usage_perc', ())]}"
        time.sleep(0.1)


# ---- health, models, tokenizer --------------------------------------------------------------------------
def test_health_503_while_loading_then_200(server: ServerProcess) -> None:
    assert 503 in server.health and server.health[-1] == 200
    assert server.health.index(200) > server.health.index(503)
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].model_extra["max_model_len"] == 8192


def test_tokenize_detokenize_round_trip(server: ServerProcess) -> None:
    text = "It is a truth universally acknowledged"
    r = post(server, "/tokenize", {"model": MODEL, "prompt": text}).json()
    assert r["count"] == len(r["tokens"]) > 3 and r["max_model_len"] == 8192
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": text}
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    decoded = post(server, "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert "Hi" in decoded
    assert_error(post(server, "/detokenize", {"tokens": [10**7]}), 400, "tokens")
    assert_error(post(server, "/tokenize", {"prompt": "a", "model": "gpt-4"}), 404, "model", "model_not_found")


# ---- completions and chat --------------------------------------------------------------------------------
def test_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL and r.created > 0
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    spec = r.usage.model_extra["speculation"]
    assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    assert spec["mean_accepted_tokens"] >= 1 and 0 <= spec["acceptance_rate"] <= 1


def test_completion_default_max_tokens_and_prompt_forms(client: openai.OpenAI, server: ServerProcess) -> None:
    ids = post(server, "/tokenize", {"prompt": PROMPTS[1]}).json()["tokens"]
    texts = client.completions.create(model=MODEL, prompt=[PROMPTS[1], PROMPTS[6]], temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in texts.choices] == [0, 1] and all(c.text for c in texts.choices)
    assert texts.usage.completion_tokens == 2 * 16  # OpenAI's default max_tokens: 16
    for prompt in (ids, [ids, ids]):
        r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
        assert [c.text for c in r.choices] == [texts.choices[0].text] * len(r.choices)
        assert r.usage.prompt_tokens == len(r.choices) * len(ids)


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Say hello."}],
                                       max_completion_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10


def test_chat_stream_chunks(client: openai.OpenAI, server: ServerProcess) -> None:
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    first, *content, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert first.choices[0].finish_reason is None
    assert content and all(len(c.choices) == 1 for c in content)
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert text == full.choices[0].message.content
    # the raw stream ends with [DONE]; without include_usage there is no usage chunk
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and all(e["choices"] for e in events[:-1])
    assert "usage" not in events[0]


def test_completion_stream(client: openai.OpenAI, server: ServerProcess) -> None:
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0, "stream": True,
                            "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    *chunks, usage, done = events
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert {e["object"] for e in events[:-1]} == {"text_completion"}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text


def test_n2_seeded(client: openai.OpenAI) -> None:
    def ask() -> Any:
        return client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=8, n=2, temperature=1.0,
                                         seed=7, extra_body={"ignore_eos": True})

    a, b = ask(), ask()
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 16
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # choice j samples with seed + j
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=4, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == \
        chat.choices[1].message.content


def test_stop_strings(client: openai.OpenAI, server: ServerProcess) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    stop = next(w for w in words[2:] if full.index(w) > 3)
    want = full[: full.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "zzzz"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                            stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_streams_equal_offline_greedy(server: ServerProcess, smol: LLM) -> None:
    """8 greedy streams at once, batched and speculated by the server, each equal to offline generation."""
    want = [o.token_ids for o in smol.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True)).outputs]
    texts = [smol.tokenizer.decode(t) for t in want]

    async def one(c: openai.AsyncOpenAI, prompt: str) -> tuple[list[int], str]:
        ids: list[int] = []
        text = ""
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in stream:
            ids += chunk.choices[0].model_extra["token_ids"]
            text += chunk.choices[0].text
        return ids, text

    async def all_of() -> list[tuple[list[int], str]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in PROMPTS))

    got = asyncio.run(all_of())
    assert [g[0] for g in got] == want
    assert [g[1] for g in got] == texts
    wait_idle(server)


# ---- going away --------------------------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_request(server: ServerProcess) -> None:
    before = metrics(server).get(("vllm:request_success_total", (("finished_reason", "abort"),)), 0)
    body = {"prompt": PROMPTS[3], "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = 0
        while got < 2:
            got += next(lines).startswith("data: ")
    m = wait_idle(server)
    assert m[("vllm:request_success_total", (("finished_reason", "abort"),))] == before + 1
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {**body, "stream": False}, timeout=httpx.Timeout(60, read=1.5))
    time.sleep(0.5)
    m = wait_idle(server)
    assert m[("vllm:request_success_total", (("finished_reason", "abort"),))] == before + 2


# ---- errors ----------------------------------------------------------------------------------------------
def test_unknown_and_unsupported_parameters_are_named(server: ServerProcess) -> None:
    err = assert_error(post(server, "/v1/completions", {"prompt": "a", "frobnicate": 1}), 400, "frobnicate")
    assert "frobnicate" in err["message"]
    err = assert_error(post(server, "/v1/completions", {"prompt": "a", "best_of": 2, "suffix": "x"}), 400, "suffix",
                       "unsupported_parameter")
    assert "best_of" in err["message"] and "suffix" in err["message"]
    for name, value in (("best_of", 3), ("suffix", "x"), ("return_hidden_states", True), ("priority", 1)):
        err = assert_error(post(server, "/v1/completions", {"prompt": "a", name: value}), 400, name)
        assert name in err["message"]
    chat = {"messages": [{"role": "user", "content": "a"}]}
    for name, value in (("tools", [{"type": "function", "function": {"name": "f"}}]),  # (SmolLM2's template has none)
                        ("response_format", {"type": "xml"}), ("logprobs", 3), ("functions", [])):
        assert_error(post(server, "/v1/chat/completions", {**chat, name: value}), 400, name, says=name)
    # their neutral values are fine
    ok = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 1, "presence_penalty": 0, "echo": False,
                                          "logprobs": None, "best_of": 1, "user": "me", "priority": 0,
                                          "return_hidden_states": False})
    assert ok.status_code == 200, ok.text


def test_bad_values_are_400(server: ServerProcess) -> None:
    cases = [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
             ({"max_tokens": "lots"}, "max_tokens"), ({"n": 0}, "n"), ({"seed": -3}, "seed"), ({"stop": [""]}, "stop"),
             ({"stream_options": {"include_usage": True}}, "stream_options"),
             ({"speculation": {"gamma": 5}}, "speculation.gamma"), ({"prompt": []}, "prompt"),
             ({"prompt": [[1, 2], [10**7]]}, "prompt")]
    for extra, param in cases:
        assert_error(post(server, "/v1/completions", {"prompt": "a", **extra}), 400, param)
    assert_error(post(server, "/v1/completions", {"max_tokens": 3}), 400, "prompt", says="prompt")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "function", "content": "x"}]}), 400,
                 "messages[0].role")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}), 400,
                 "messages[0].tool_call_id")
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, says="JSON")


def test_prompt_over_the_context_is_400(server: ServerProcess) -> None:
    err = assert_error(post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 9000}), 400, "prompt",
                       "context_length_exceeded")
    assert "8192" in err["message"] and "max_tokens" in err["message"]
    long = "word " * 9000
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}), 400,
                 "messages", "context_length_exceeded")
    m = metrics(server)
    assert m[("vllm:num_requests_waiting", ())] == 0


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="a", max_tokens=1)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


def test_body_over_the_limit_is_413(server: ServerProcess) -> None:
    limit = 1 << 20
    # announced by Content-Length: refused before the body is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders(b"{}")
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()

    # sent in chunks without a length: counted as it arrives
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"a" * (1 << 16)
        yield b'"}'

    r2 = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30,
                    headers={"content-type": "application/json"})
    assert_error(r2, 413, code="request_too_large")


def test_api_key(guarded: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{guarded.url}/v1/models", headers=headers)
        assert_error(r, 401, code="invalid_api_key")
        assert_error(httpx.get(f"{guarded.url}/metrics", headers=headers), 401)
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    c = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sekret", max_retries=0)
    assert [m.id for m in c.models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="nope", max_retries=0).models.list()


def test_queue_full_is_503_with_retry_after(guarded: ServerProcess) -> None:
    auth = {"Authorization": "Bearer sekret"}
    body = {"prompt": PROMPTS[0], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{guarded.url}/v1/completions", json=body, headers=auth, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # (kept: a dropped iterator closes the connection)
        next(line for line in lines if line.startswith("data: "))  # it runs
        full = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=auth,
                          timeout=30)
        assert_error(full, 503, code="queue_full")
        assert int(full.headers["retry-after"]) >= 1
    wait_idle(guarded, headers=auth)
    ok = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=auth, timeout=60)
    assert ok.status_code == 200, ok.text


# ---- metrics and shutdown --------------------------------------------------------------------------------
def test_metrics(server: ServerProcess, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})  # the same prompt again: prefix-cache lookups
    text = httpx.get(f"{server.url}/metrics").text
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    names = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
             "vllm:prefix_cache_hits_total", "vllm:request_success_total", "vllm:spec_decode_num_drafts_total",
             "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total",
             "vllm:spec_decode_num_accepted_tokens_per_pos_total", "vllm:time_to_first_token_seconds_count",
             "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
             "vllm:e2e_request_latency_seconds_bucket"}
    assert names <= set(samples), names - set(samples)
    assert all(s.labels.get("model_name") == MODEL for s in samples.values())
    m = metrics(server)
    assert m[("vllm:generation_tokens_total", ())] >= 12 and m[("vllm:prompt_tokens_total", ())] > 0
    assert m[("vllm:prefix_cache_queries_total", ())] > 0
    assert m[("vllm:spec_decode_num_draft_tokens_total", ())] >= m[("vllm:spec_decode_num_accepted_tokens_total",
                                                                   ())] > 0
    assert m[("vllm:request_success_total", (("finished_reason", "length"),))] >= 2
    assert m[("vllm:time_to_first_token_seconds_count", ())] >= 2
    assert 0 <= m[("vllm:kv_cache_usage_perc", ())] <= 1


def test_sigterm_lets_running_requests_finish(tmp_path: Path) -> None:
    server = ServerProcess([*ENGINE, "--max-num-seqs", "2"], tmp_path / "drain.log")
    try:
        server.wait_ready()
        body = {"prompt": PROMPTS[0], "max_tokens": 40, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:  # no new request is served: the port is closed, or the answer is 503
                late = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 1}, timeout=5)
                assert late.status_code == 503
            except httpx.TransportError:
                pass
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert rest[-1]["usage"]["completion_tokens"] == 40
        assert rest[-2]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_tensor_parallel_server_under_torchrun(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m magicdec serve`: rank 0 answers HTTP and schedules, both ranks run the
    same steps; concurrent greedy requests give one process's tokens; SIGTERM drains and stops every rank."""
    from conftest import random_prompts, tiny_config, write_checkpoint
    from magicdec import Engine

    path = write_checkpoint(tmp_path / "tiny", tiny_config(n_heads=4, n_kv_heads=2), seed=3)
    prompts = random_prompts(4, [60, 140, 90, 200], 384, seed=4)
    llm = LLM(path, device="cpu")
    spec = ["--spec", "self", "--budget", "128", "--sinks", "4", "--gamma", "2"]
    want = [o.token_ids for o in Engine(llm=llm, spec=None, prefill_chunk=256, quiet=True).run(
        prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    server = ServerProcess(["--model", str(path), *ENGINE, *spec], tmp_path / "tp.log", launcher=launcher)
    try:
        server.wait_ready()

        async def one(c: openai.AsyncOpenAI, prompt: list[int]) -> list[int]:
            r = await c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
            return r.choices[0].model_extra["token_ids"]

        async def all_of() -> list[list[int]]:
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                          timeout=120) as c:
                return await asyncio.gather(*(one(c, p) for p in prompts))

        assert asyncio.run(all_of()) == want
        wait_idle(server)
        # SIGTERM to rank 0 (torchrun itself turns a SIGTERM into a failure): it drains, tells rank 1, both end
        os.kill(rank_pid(server.proc.pid, 0), signal.SIGTERM)
        rc = server.proc.wait(60)
    finally:
        server.stop()
    assert rc == 0, server.tail()


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=`rank`."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if int((child / "stat").read_text().split(") ")[1].split()[1]) != launcher:
                continue
            env = dict(e.split("=", 1) for e in (child / "environ").read_text().split("\0") if "=" in e)
        except (OSError, ValueError, IndexError):
            continue
        if env.get("RANK") == str(rank):
            return int(child.name)
    raise AssertionError(f"no worker of rank {rank} under process {launcher}")
