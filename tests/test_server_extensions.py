"""What real clients send beyond OpenAI's core: vLLM's request extensions, log-probabilities (streamed too, and
echo with the prompt's), penalties and logit bias, served by `magicdec serve` with self-speculation. Greedy
requests with speculation off (`speculation: {"gamma": 0}`) and on give the same tokens and log-probabilities."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from test_server import ENGINE, MODEL, ServerProcess, assert_error, post, sse_events, started

pytestmark = pytest.mark.slow

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
OFF = {"speculation": {"gamma": 0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*ENGINE, "--max-num-seqs", "4", "--spec", "self", "--budget", "64", "--gamma", "3"]
    yield from started(tmp_path_factory.mktemp("serve"), "extensions", args)


def complete(server: ServerProcess, **body: Any) -> dict[str, Any]:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_logprobs_equal_with_speculation_on_and_off(server: ServerProcess) -> None:
    on = complete(server, logprobs=3, return_token_ids=True)
    off = complete(server, logprobs=3, return_token_ids=True, **OFF)
    assert on["usage"]["speculation"]["num_drafts"] > 0 and off["usage"]["speculation"]["num_drafts"] == 0
    a, b = on["choices"][0], off["choices"][0]
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    la, lb = a["logprobs"], b["logprobs"]
    assert len(la["tokens"]) == len(a["token_ids"]) and la["tokens"] == lb["tokens"]
    assert max(abs(x - y) for x, y in zip(la["token_logprobs"], lb["token_logprobs"])) <= 1e-5
    for ta, tb, chosen, lp in zip(la["top_logprobs"], lb["top_logprobs"], la["tokens"], la["token_logprobs"]):
        assert ta.keys() == tb.keys() and max(abs(ta[k] - tb[k]) for k in ta) <= 1e-5
        assert 3 <= len(ta) <= 4 and ta[chosen] == lp and max(ta.values()) == lp  # greedy: the best token
    assert la["text_offset"][0] == 0 and la["text_offset"] == sorted(la["text_offset"])


def test_echo_with_prompt_logprobs(server: ServerProcess) -> None:
    """lm-eval's log-likelihood request: echo + logprobs; the prompt's tokens first, the first one without."""
    out = complete(server, echo=True, logprobs=1, max_tokens=1, return_token_ids=True)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    n = out["usage"]["prompt_tokens"]
    assert choice["text"].startswith(PROMPT) and len(lp["tokens"]) == n + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"][:n]).endswith(PROMPT[-20:])
    again = complete(server, echo=True, logprobs=1, max_tokens=1)["choices"][0]["logprobs"]  # (cached prompt)
    assert again["token_logprobs"] == lp["token_logprobs"]
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True,
                                         "logprobs": 0, "stream": True})
    events = sse_events(r)
    first = events[0]["choices"][0]
    assert first["text"].startswith(PROMPT) and first["logprobs"]["token_logprobs"][0] is None
    streamed = [t for e in events[:-1] for t in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(streamed) == n + 4


def test_chat_logprobs_streamed(server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert len(content) == whole_tokens(server, body) and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    events = sse_events(post(server, "/v1/chat/completions", {**body, "stream": True, **OFF}))
    streamed = [c for e in events[:-1] for ch in e["choices"] if ch["logprobs"] for c in ch["logprobs"]["content"]]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(streamed, content)) <= 1e-5


def whole_tokens(server: ServerProcess, body: dict[str, Any]) -> int:
    return post(server, "/v1/chat/completions", body).json()["usage"]["completion_tokens"]


@pytest.mark.parametrize("penalty", [{"presence_penalty": 1.5}, {"frequency_penalty": 1.0},
                                     {"repetition_penalty": 1.5}, {"logit_bias": {"198": -100, "13": 5}}])
def test_penalties_greedy_equal_with_speculation_on_and_off(server: ServerProcess, penalty: dict[str, Any]) -> None:
    plain = complete(server, return_token_ids=True, max_tokens=32)["choices"][0]["token_ids"]
    off = complete(server, return_token_ids=True, max_tokens=32, **penalty, **OFF)["choices"][0]["token_ids"]
    on = complete(server, return_token_ids=True, max_tokens=32, **penalty)
    assert on["choices"][0]["token_ids"] == off != plain
    assert on["usage"]["speculation"]["num_drafts"] > 0


def test_vllm_extensions(server: ServerProcess) -> None:
    base = complete(server, return_token_ids=True)["choices"][0]
    ids = base["token_ids"]
    # stop_token_ids: the fourth token stops it (its text is not in the output)
    out = complete(server, stop_token_ids=[ids[3]], return_token_ids=True)["choices"][0]
    assert out["token_ids"] == ids[: ids.index(ids[3]) + 1] and out["finish_reason"] == "stop"
    # a stop string, with and without include_stop_str_in_output (SGLang's no_stop_trim: the same)
    stop = base["text"][5:9]
    cut = complete(server, stop=[stop])["choices"][0]["text"]
    kept = complete(server, stop=[stop], include_stop_str_in_output=True)["choices"][0]["text"]
    assert kept == cut + stop and complete(server, stop=[stop], no_stop_trim=True)["choices"][0]["text"] == kept
    # min_tokens: EOS held back (ignore_eos off; a long enough output)
    assert complete(server, min_tokens=24)["usage"]["completion_tokens"] == 24
    # truncate_prompt_tokens: the prompt's last 5 tokens
    assert complete(server, truncate_prompt_tokens=5, max_tokens=2)["usage"]["prompt_tokens"] == 5
    # accepted: min_p, seed, priority 0, special-token flags
    for extra in ({"min_p": 0.1, "temperature": 1.0, "seed": 3}, {"priority": 0},
                  {"skip_special_tokens": False, "spaces_between_special_tokens": False}):
        complete(server, **extra)
    for extra, param in (({"priority": 2}, "priority"), ({"min_tokens": 30, "max_tokens": 10}, "min_tokens"),
                         ({"stop_token_ids": [10**7]}, "stop_token_ids"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                         ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 2}, "min_p"),
                         ({"logprobs": 50}, "logprobs"), ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                         ({"return_hidden_states": True}, "return_hidden_states")):
        assert_error(post(server, "/v1/completions", {"prompt": "a", **extra}), 400, param, says=param)
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                       "top_logprobs": 2}), 400, "top_logprobs")


def test_continuous_usage_stats(server: ServerProcess) -> None:
    """GuideLLM's streaming request: usage in every chunk, growing to the final count."""
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "stream": True,
                                         "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    usages = [e["usage"] for e in events[:-1]]
    assert all(u is not None for u in usages)
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[-1] == 10 and usages[0]["prompt_tokens"] == usages[-1]["prompt_tokens"]
    with httpx.Client(timeout=60) as c:  # the chat route too
        r = c.post(f"{server.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
            "stream_options": {"continuous_usage_stats": True}})
        assert all(e["usage"]["prompt_tokens"] > 0 for e in sse_events(r)[:-1])


# ---- structured outputs: the openai SDK's parse with pydantic models --------------------------------------
class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


class Flag(BaseModel):
    ok: bool


class Palette(BaseModel):
    colours: list[Colour] = Field(max_length=3)


class City(BaseModel):
    city: str = Field(max_length=12)
    country: str = Field(max_length=12)


class Score(BaseModel):
    score: int = Field(ge=1, le=10)
    reason: str = Field(max_length=16)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=4)


class Book(BaseModel):
    title: str = Field(max_length=16)
    year: int = Field(ge=1500, le=2030)


class Point(BaseModel):
    x: int = Field(ge=-9, le=9)
    y: int = Field(ge=-9, le=9)


class Answer(BaseModel):
    answer: Literal["yes", "no"]


class Owner(BaseModel):
    person: Person
    pet: Pet


MODELS = [Person, Flag, Palette, City, Score, Pet, Book, Point, Answer, Owner]


def test_sdk_parse_returns_valid_objects(server: ServerProcess) -> None:
    """`client.beta.chat.completions.parse(response_format=<pydantic model>)` for 10 schemas, speculation on; the
    same greedy output with speculation off (3 of them)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    for i, model in enumerate(MODELS):
        ask = dict(model=MODEL, messages=[{"role": "user", "content": f"Give me a {model.__name__} as JSON."}],
                   response_format=model, max_tokens=80, temperature=0)
        on = client.beta.chat.completions.parse(**ask)
        parsed = on.choices[0].message.parsed
        assert isinstance(parsed, model), (model.__name__, on.choices[0].message.content)
        if i < 3:
            off = client.beta.chat.completions.parse(**ask, extra_body=OFF)
            assert off.choices[0].message.content == on.choices[0].message.content
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Pick one"}], "max_tokens": 8,
                                              "structured_outputs": {"choice": ["left side", "right-side (b)"]}})
    assert r.json()["choices"][0]["message"]["content"] in ("left side", "right-side (b)")
    bad_regex = {"messages": [{"role": "user", "content": "a"}], "structured_outputs": {"regex": "("}}
    assert_error(post(server, "/v1/chat/completions", bad_regex), 400, "structured_outputs")
