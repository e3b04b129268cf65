"""Model-free drafts in the engine (prompt lookup, suffix matching, and the hybrid that chooses per request
and round between them and the sparse self-draft): greedy output is plain decoding's, token for token, on
text that repeats (so proposals are made and verified), across preemptions, and with each request asking
for its own method beside the others."""

from __future__ import annotations

import pytest

from conftest import random_prompts
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.engine.request import RequestSpec
from magicdec.spec.config import DraftTuning

NGRAM = SpecConfig(method="self", drafter="ngram", gamma=6)
SUFFIX = SpecConfig(method="self", drafter="suffix", gamma=6)
HYBRID = SpecConfig(method="self", drafter="hybrid", gamma=4, budget=96, sinks=4, draft_weights="int8")
HYBRID_NGRAM = SpecConfig(method="self", drafter="hybrid", gamma="auto", budget=96, sinks=4,
                          tuning=DraftTuning(lookup="ngram", ngram_min=1))


@pytest.fixture(scope="module")
def repeating(tiny_llm: LLM) -> list[list[int]]:
    """Prompts whose end repeats an earlier part (a document quoted back): lookups find what follows."""
    base = random_prompts(5, [120, 300, 90, 200, 150], tiny_llm.config.vocab_size, seed=21)
    return [p + p[10:70] for p in base]


@pytest.fixture(scope="module")
def plain(tiny_llm: LLM, repeating: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    return [o.token_ids for o in tiny_llm.generate(repeating, params).outputs]


@pytest.mark.parametrize("spec", [NGRAM, SUFFIX, HYBRID, HYBRID_NGRAM], ids=lambda s: s.label)
def test_greedy_equals_plain(tiny_llm: LLM, repeating: list[list[int]], plain: list[list[int]],
                             spec: SpecConfig) -> None:
    r = tiny_llm.generate(repeating, SamplingParams(max_new_tokens=40, ignore_eos=True), spec)
    assert [o.token_ids for o in r.outputs] == plain
    assert r.stats.acceptance.draft_tokens > 0 and r.stats.acceptance.accepted_tokens > 0


def test_preempted_requests_keep_their_proposers(tiny_llm: LLM, repeating: list[list[int]],
                                                 plain: list[list[int]]) -> None:
    """A pool too small for every request at once: preempted requests recompute their KV, not their index."""
    e = Engine(llm=tiny_llm, spec=SUFFIX, num_blocks=12, max_num_seqs=5, prefill_chunk=128,
               max_num_batched_tokens=256, quiet=True)
    outs = e.run(repeating, SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert [o.token_ids for o in outs] == plain
    assert e.core.scheduler.preemptions > 0 and e.stats.spec.draft_tokens > 0
    e.check_no_leaks()


def test_forget_outputs_makes_a_rerun_draft_as_the_first_run(tiny_llm: LLM, repeating: list[list[int]],
                                                              plain: list[list[int]]) -> None:
    """The same prompts again: suffix drafts find the last run's outputs in the shared store and accept more —
    what a benchmark must not measure; after `forget_outputs` the rerun drafts exactly as the first run."""
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    core = tiny_llm.core_for(repeating, params, SUFFIX)
    try:
        first, again = (tiny_llm.run(core, repeating, params) for _ in range(2))
        core.forget_outputs()
        fresh = tiny_llm.run(core, repeating, params)
    finally:
        core.close()
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in fresh.outputs] == plain
    assert again.stats.acceptance.accepted_tokens > first.stats.acceptance.accepted_tokens
    assert (fresh.stats.acceptance.accepted_tokens, fresh.stats.acceptance.draft_tokens) == \
        (first.stats.acceptance.accepted_tokens, first.stats.acceptance.draft_tokens)


def test_each_request_its_own_method(tiny_llm: LLM, repeating: list[list[int]], plain: list[list[int]]) -> None:
    """One engine (a streaming self-draft), five requests side by side: off, the model draft, prompt lookup,
    suffix matching, hybrid — every one plain decoding's tokens; each drafted with what it asked for."""
    e = Engine(llm=tiny_llm, spec=SpecConfig(method="self", budget=96, sinks=4, gamma=4), prefill_chunk=128,
               quiet=True)
    methods = ["none", "self", "ngram", "suffix", "hybrid"]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ids = [e.add_request(p, params, RequestSpec(method=m)) for p, m in zip(repeating, methods)]
    sources: dict[str, set[str]] = {i: set() for i in ids}
    final = {}
    while e.has_unfinished_requests():
        outs = e.step()
        report = e.last_step
        for rid, g, src in zip(report.request_ids, report.gammas, report.sources or []):
            if g:
                sources[rid].add(src)
        final.update((o.request_id, o) for o in outs if o.finished)
    assert [final[i].token_ids for i in ids] == plain
    assert sources[ids[0]] == set() and sources[ids[1]] == {"self"}
    assert sources[ids[2]] == {"ngram"} and sources[ids[3]] <= {"suffix", "suffix-global"} and sources[ids[3]]
    assert sources[ids[4]] and sources[ids[4]] <= {"self", "suffix", "suffix-global"}


def test_requests_that_need_a_model_draft_are_refused_without_one(tiny_llm: LLM) -> None:
    e = Engine(llm=tiny_llm, spec=NGRAM, prefill_chunk=128, quiet=True)
    with pytest.raises(ValueError, match="has none: start it with --spec self"):
        e.add_request([5, 6, 7], SamplingParams(max_new_tokens=4), RequestSpec(method="hybrid"))
    plain_engine = Engine(llm=tiny_llm, prefill_chunk=128, quiet=True)
    with pytest.raises(ValueError, match="runs without speculation"):
        plain_engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=4), RequestSpec(method="ngram"))
    with pytest.raises(ValueError, match="method must be one of"):
        RequestSpec(method="lookahead")


def test_server_requests_choose_their_methods_side_by_side(tiny_llm: LLM, repeating: list[list[int]],
                                                           plain: list[list[int]]) -> None:
    """Through the HTTP API: five concurrent requests, each with its own `speculation.method`, served by one
    engine together — every one plain decoding's tokens, and the server's speculation figures show drafting
    where a method drafts."""
    from concurrent.futures import ThreadPoolExecutor

    from app_server import AppServer

    def load() -> Engine:
        return Engine(llm=tiny_llm, spec=SpecConfig(method="self", budget=96, sinks=4, gamma=4), prefill_chunk=128,
                      max_num_seqs=5, quiet=True)

    methods = ["none", "self", "ngram", "suffix", "hybrid"]
    with AppServer(load) as server:
        def ask(prompt: list[int], method: str) -> dict:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, "speculation": {"method": method}}
            r = server.post("/v1/completions", body)
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(len(methods)) as pool:
            answers = list(pool.map(ask, repeating, methods))
    assert [a["choices"][0]["token_ids"] for a in answers] == plain
    drafted = [a["usage"]["speculation"]["draft_tokens"] for a in answers]
    assert drafted[0] == 0 and all(d > 0 for d in drafted[1:]), drafted
