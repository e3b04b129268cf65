"""vLLM's `prompt_logprobs` on both routes, served with self-speculation on: None for the first prompt token,
then {token id: {logprob, rank, decoded_token}} of the prompt token and its position's k best, equal to
transformers' log-softmax within 1e-5; completions carry them per choice, chat at the top (vLLM's places);
bounds as vLLM's (0 … 20, none in a stream)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app_server import AppServer, chat_checkpoint
from conftest import hf_model
from magicdec import LLM, Engine, SpecConfig

OFF = {"speculation": {"gamma": 0}}
TEXT = "w5 w17 w300 w42 w42 w9 w120 w7 w250 w3 w77 w61 w200"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_checkpoint(tmp_path_factory.mktemp("plp"), seed=3)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[AppServer]:
    llm = LLM(checkpoint, device="cpu")
    spec = SpecConfig(method="self", budget=16, sinks=4, gamma=3)
    with AppServer(lambda: Engine(llm=llm, spec=spec, max_num_seqs=4, prefill_chunk=8, quiet=True)) as s:
        yield s


def exact(checkpoint: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities of every position after the first: [len(ids) - 1, V]."""
    with torch.no_grad():
        logits = hf_model(checkpoint)(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.double(), -1)


def check(plp: list[Any], ids: list[int], lp: torch.Tensor, k: int, server: AppServer) -> None:
    assert len(plp) == len(ids) and plp[0] is None
    tok = server.engine.llm.tokenizer
    for i, (entry, t) in enumerate(zip(plp[1:], ids[1:])):
        row = lp[i]
        best = row.topk(k).indices.tolist()
        assert set(entry) == {str(x) for x in [t, *best]}, (i, entry)
        mine = entry[str(t)]
        assert abs(mine["logprob"] - float(row[t])) <= 1e-5, (i, mine, float(row[t]))
        assert mine["rank"] == int((row >= row[t]).sum()) and mine["decoded_token"] == tok.decode([t])
        for r, x in enumerate(best, 1):
            assert entry[str(x)]["rank"] == r and abs(entry[str(x)]["logprob"] - float(row[x])) <= 1e-5


def test_completions_prompt_logprobs_equal_transformers_with_speculation_on(server: AppServer,
                                                                            checkpoint: Path) -> None:
    body = {"prompt": TEXT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    on = server.post("/v1/completions", {**body, "prompt_logprobs": 3})
    assert on.status_code == 200, on.text
    choice = on.json()["choices"][0]
    assert on.json()["usage"]["speculation"]["num_drafts"] > 0
    ids = choice["prompt_token_ids"]
    check(choice["prompt_logprobs"], ids, exact(checkpoint, ids), 3, server)
    off = server.post("/v1/completions", {**body, "prompt_logprobs": 3, **OFF}).json()["choices"][0]
    plain = server.post("/v1/completions", body).json()["choices"][0]
    assert choice["token_ids"] == off["token_ids"] == plain["token_ids"] and "prompt_logprobs" not in plain
    assert choice["prompt_logprobs"] == off["prompt_logprobs"]
    # echo's log-probabilities keep their own k (1) beside prompt_logprobs' (4): vLLM's two fields
    both = server.post("/v1/completions", {**body, "echo": True, "logprobs": 1, "prompt_logprobs": 4}).json()
    c = both["choices"][0]
    assert all(top is None or len(top) <= 2 for top in c["logprobs"]["top_logprobs"])
    check(c["prompt_logprobs"], ids, exact(checkpoint, ids), 4, server)
    zero = server.post("/v1/completions", {**body, "prompt_logprobs": 0}).json()["choices"][0]["prompt_logprobs"]
    assert [e if e is None else list(e) for e in zero] == [None] + [[str(t)] for t in ids[1:]]


def test_chat_prompt_logprobs_at_the_top(server: AppServer, checkpoint: Path) -> None:
    body = {"messages": [{"role": "user", "content": TEXT}], "max_tokens": 6, "temperature": 0,
            "prompt_logprobs": 2}
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = server.post("/tokenize", {"messages": body["messages"]}).json()["tokens"]
    check(out["prompt_logprobs"], ids, exact(checkpoint, ids), 2, server)
    assert "prompt_logprobs" not in out["choices"][0]


def test_prompt_logprobs_bounds(server: AppServer) -> None:
    base = {"prompt": TEXT, "max_tokens": 2}
    for value in (21, -1, True, 1.5, "3"):
        r = server.post("/v1/completions", {**base, "prompt_logprobs": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", (value, r.text)
    r = server.post("/v1/completions", {**base, "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    assert server.post("/v1/completions", {**base, "prompt_logprobs": 0, "stream": True}).status_code == 200
    assert server.post("/v1/completions", {**base, "prompt_logprobs": 20}).status_code == 200
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 2,
                                             "prompt_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
