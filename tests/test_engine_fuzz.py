"""A property-based fuzz of the serving engine (hypothesis) over the tiny random checkpoint.

Each example draws a scenario: a speculation setting (plain; self-speculation with a StreamingLLM, SnapKV or
guided draft, or int8 draft weights; a self-draft or a draft model with a pool of its own), a pool small enough
to preempt, a prefill chunk (64, 96 or 128 against blocks of 64), up to `max_num_seqs` running requests, and requests
that arrive at random steps, share prefixes with earlier ones, fix their own γ (or turn speculation off),
sample or decode greedily, and are aborted at random steps (during their prefill too). After every step:

- every block's reference count is the number of running requests holding it (the prefix cache holds no
  reference: a cached block nobody holds is free; a sliding group's ring counts), waiting requests hold
  nothing, a block two requests share carries a prefix hash;
- the free blocks — uncached ones, and cached ones (evictable) — are exactly the blocks of count 0, each in one
  list, the cached ones hashed and the others not; the prefix cache's two maps (hash → block, block → hash) agree;
- each stream's deltas add up (`num_tokens`), and a final output's `token_ids` are its deltas.

At the end no block is held (`BlockPool.check_empty`), and every finished greedy request's tokens equal its
prompt decoded alone with plain decoding (computed once per prompt and prefill chunk, for the session).

Every speculation setting gets its own examples. Profiles: the default one ("engine-fuzz", 2 examples per
setting, derandomized) is bounded for `make test` (about a minute of CPU time on a 2-core machine);
`HYPOTHESIS_PROFILE=nightly pytest tests/test_engine_fuzz.py` runs 100 random examples per setting, with more
requests, longer prompts and outputs.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.engine.core import EngineCore
from magicdec.engine.request import Status
from magicdec.spec.config import DraftTuning

settings.register_profile("engine-fuzz", max_examples=2, deadline=None, derandomize=True, database=None,
                          print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nightly", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "engine-fuzz")
NIGHTLY = PROFILE == "nightly"

MAX_NEW = 24 if NIGHTLY else 12
MAX_PROMPT = 400 if NIGHTLY else 260
SPECS = {
    "plain": None,
    "self": SpecConfig(method="self", budget=96, sinks=4, gamma=3),
    "snapkv": SpecConfig(method="self", drafter="snapkv", budget=128, gamma=2),
    "guided": SpecConfig(method="self", drafter="guided", budget=192, sinks=4, gamma=2,
                         tuning=DraftTuning(guided_window=64)),
    "int8": SpecConfig(method="self", budget=96, sinks=4, gamma=2, draft_weights="int8"),
    # the self-draft with KV of its own, in a pool of its own
    "own-kv": SpecConfig(method="self", budget=96, sinks=4, gamma=2, tuning=DraftTuning(kv_source="own")),
    "draft": "draft",  # a draft model (the tiny checkpoint itself) with a pool of its own
}


@dataclass(frozen=True)
class Req:
    prompt: tuple[int, ...]
    max_new: int
    gamma: int | None  # its own γ (None: the engine's)
    sampled: bool
    arrive: int  # the step before which it is added
    abort: int | None  # … and aborted (steps after its arrival)


@dataclass(frozen=True)
class Scenario:
    spec: str
    chunk: int
    max_num_seqs: int
    spare_blocks: int
    requests: tuple[Req, ...]


@st.composite
def scenarios(draw: st.DrawFn, spec: str) -> Scenario:
    bound = 0 if spec == "plain" else 2
    n = draw(st.integers(1, 7 if NIGHTLY else 5))
    prompts: list[tuple[int, ...]] = []
    reqs = []
    for _ in range(n):
        if prompts and draw(st.booleans()):  # a shared prefix with an earlier prompt
            base = draw(st.sampled_from(prompts))
            keep = draw(st.integers(1, len(base)))
            tail = draw(st.lists(st.integers(3, 383), min_size=0, max_size=80))
            prompt = (base[:keep] + tuple(tail))[:MAX_PROMPT] or (5,)
        else:
            length = draw(st.integers(1, MAX_PROMPT))
            seed = draw(st.integers(0, 1 << 16))
            prompt = tuple((seed * 7919 + i * 104729) % 381 + 3 for i in range(length))
        prompts.append(prompt)
        gamma = draw(st.one_of(st.none(), st.integers(0, bound))) if bound else None
        abort = draw(st.one_of(st.none(), st.integers(0, 12)))
        reqs.append(Req(prompt, draw(st.integers(1, MAX_NEW)), gamma, draw(st.booleans()),
                        draw(st.integers(0, 10)), abort))
    return Scenario(spec, draw(st.sampled_from([64, 96, 128])), draw(st.integers(1, 4)), draw(st.integers(0, 6)),
                    tuple(reqs))


@pytest.fixture(scope="module")
def reference(tiny_llm: LLM) -> dict[tuple[tuple[int, ...], int], list[int]]:
    """Prompt and prefill chunk → its greedy tokens alone (plain decoding, MAX_NEW of them), filled lazily."""
    return {}


def alone(llm: LLM, ref: dict, prompt: tuple[int, ...], chunk: int) -> list[int]:
    key = (prompt, chunk)
    if key not in ref:
        e = Engine(llm=llm, prefill_chunk=chunk, max_num_batched_tokens=256, num_blocks=16, quiet=True)
        ref[key] = e.run([list(prompt)], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))[0].token_ids
    return ref[key]


def check_books(core: EngineCore) -> None:
    """The block pool's invariants against the requests that hold blocks now."""
    pool = core.pool
    holders: Counter[int] = Counter()
    sizes = core.scheduler.ring_sizes
    for r in core.scheduler.running:
        assert r.status in (Status.PREFILLING, Status.DECODING)
        assert len(set(r.held)) == len(r.held)
        assert len(r.blocks) * pool.block_size >= r.computed
        # a sliding group's ring: as many blocks as the row's columns, up to its size
        assert [len(ring) for ring in r.rings] == [min(n, len(r.blocks)) for n in sizes]
        holders.update(r.held)
    for r in core.scheduler.waiting:
        assert not r.held and r.status is Status.WAITING
    for b in range(pool.num_blocks):
        assert pool.refs[b] == holders[b], f"block {b}: {pool.refs[b]} references, {holders[b]} holders"
        if holders[b] > 1:
            assert pool.hash_of[b] is not None, f"block {b} is shared but holds no cached prefix"
    assert not set(pool.free) & set(pool.evictable)
    assert set(pool.free) | set(pool.evictable) == {b for b in range(pool.num_blocks) if pool.refs[b] == 0}
    assert all(pool.hash_of[b] is None for b in pool.free) and all(pool.hash_of[b] is not None for b in pool.evictable)
    for h, b in pool.cached.items():
        assert pool.hash_of[b] == h
    assert sum(h is not None for h in pool.hash_of) == len(pool.cached)


def engine_for(llm: LLM, tiny_dir: Path, s: Scenario) -> Engine:
    spec = SPECS[s.spec]
    if spec == "draft":
        spec = SpecConfig(method="draft", draft_model=str(tiny_dir), drafter="streaming", budget=96, sinks=4, gamma=2)
    need = 0
    for r in s.requests:  # the largest request must fit the pool alone
        lookahead = (spec.gamma_bound + 1) if spec is not None else 1
        kept = -(-spec.n_kept // 64) if spec is not None and spec.drafter == "snapkv" else 0
        need = max(need, -(-(len(r.prompt) + r.max_new + lookahead) // 64) + kept)
    return Engine(llm=llm, spec=spec, prefill_chunk=s.chunk, max_num_batched_tokens=256,
                  num_blocks=need + s.spare_blocks, max_num_seqs=s.max_num_seqs, quiet=True)


@pytest.mark.parametrize("spec", sorted(SPECS))
@settings.get_profile(PROFILE)
@given(data=st.data())
def test_engine_invariants_under_random_traffic(tiny_llm: LLM, tiny_dir: Path, reference: dict, spec: str,
                                                data: st.DataObject) -> None:
    s = data.draw(scenarios(spec))
    e = engine_for(tiny_llm, tiny_dir, s)
    core = e.core
    ids: dict[str, int] = {}
    streamed: dict[int, list[int]] = {}
    final: dict[int, tuple[str, list[int]]] = {}
    step = 0
    while len(ids) < len(s.requests) or e.has_unfinished_requests():
        for i, r in enumerate(s.requests):
            if r.arrive == step:
                params = SamplingParams(max_new_tokens=r.max_new, ignore_eos=True,
                                        temperature=0.8 if r.sampled else 0.0, seed=i)
                ids[e.add_request(list(r.prompt), params, r.gamma)] = i
            if r.abort is not None and r.arrive + r.abort == step:
                rid = next(k for k, v in ids.items() if v == i)
                e.abort_request(rid)
        check_books(core)
        for out in e.step():
            i = ids[out.request_id]
            streamed.setdefault(i, []).extend(out.new_token_ids)
            assert out.num_tokens == len(streamed[i])
            if out.finished:
                assert out.token_ids == streamed[i] and out.finish_reason in ("length", "abort")
                final[i] = (out.finish_reason, out.token_ids)
            else:
                assert out.token_ids == [] and out.text == ""
        check_books(core)
        step += 1
        assert step < 3000, "the engine stopped making progress"
    e.check_no_leaks()
    assert set(final) == set(range(len(s.requests)))
    for i, (reason, tokens) in final.items():
        r = s.requests[i]
        if reason == "length":
            assert len(tokens) == r.max_new
        if not r.sampled:
            ref = alone(tiny_llm, reference, r.prompt, s.chunk)
            assert tokens == ref[: len(tokens)], f"request {i} ({reason})"
    assert e.prefix_cache.queries <= sum(len(r.prompt) for r in s.requests)
