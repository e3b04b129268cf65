"""The serving engine: requests over time, continuous batching over the paged cache, speculation per request.

Exactness: every request's greedy tokens equal those of the same prompt decoded alone with plain decoding
(bit-exact on the CPU), whatever arrived before, beside or after it — across preemptions, prefix-cache
hits and aborts of its neighbours — and equal transformers' greedy tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from conftest import hf_greedy, hf_model, random_prompts
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.cache.blocks import BlockPool, chain_hashes
from magicdec.engine.request import RequestSpec
from magicdec.spec.config import DraftTuning

CHUNK = 128  # prefill chunk of the tests' engines (small prompts still take several chunks)
SELF = SpecConfig(method="self", budget=96, sinks=4, gamma=3)


def engine(llm: LLM, spec: SpecConfig | None = None, **kw: object) -> Engine:
    opts = dict(prefill_chunk=CHUNK, max_num_batched_tokens=256, quiet=True)
    return Engine(llm=llm, spec=spec, **{**opts, **kw})  # type: ignore[arg-type]


def alone(llm: LLM, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Each prompt decoded by itself with plain decoding: the reference."""
    e = engine(llm)
    return [e.run([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids
            for p, n in zip(prompts, lengths)]


def run_trace(e: Engine, prompts: list[list[int]], lengths: list[int], arrive: list[int], abort: dict[int, int],
              spec: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Request i arrives before step arrive[i]; request j is aborted before step abort[j]. Returns the
    finished requests' tokens by index, checking each stream's deltas add up to its tokens, and that the
    prefix cache counted each request's lookup once (its hits: the requests' cached tokens)."""
    ids: dict[str, int] = {}
    cached = 0
    streamed: dict[int, list[int]] = {}
    done: dict[int, list[int]] = {}
    step = 0
    while len(ids) < len(prompts) or e.has_unfinished_requests():
        for i, at in enumerate(arrive):
            if at == step:
                params = SamplingParams(max_new_tokens=lengths[i], ignore_eos=True)
                ids[e.add_request(prompts[i], params, (spec or {}).get(i))] = i
        for j, at in abort.items():
            if at == step:
                e.abort_request(next(r for r, i in ids.items() if i == j))
        for out in e.step():
            i = ids[out.request_id]
            streamed.setdefault(i, []).extend(out.new_token_ids)
            assert out.num_tokens == len(streamed[i])
            assert out.token_ids == (streamed[i] if out.finished else [])  # the whole output: on the last one only
            if out.finished:
                cached += out.metrics.cached_tokens
            if out.finished and out.finish_reason != "abort":
                done[i] = out.token_ids
        step += 1
        assert step < 2000
    e.check_no_leaks()
    assert e.prefix_cache.hits == cached and e.prefix_cache.queries <= sum(map(len, prompts))
    return done


@pytest.fixture(scope="module")
def trace(tiny_llm: LLM) -> tuple[list[list[int]], list[int], list[int], dict[int, int]]:
    """16 requests: staggered arrivals, prompts of 20–700 tokens (two share a 512-token prefix with an
    earlier one: prefix-cache hits), 4–40 new tokens, one aborted mid-way."""
    lens = [300, 40, 700, 129, 64, 513, 20, 260, 650, 90, 384, 200, 33, 600, 700, 128]
    prompts = random_prompts(16, lens, tiny_llm.config.vocab_size, seed=3)
    prompts[13] = prompts[2][:512] + prompts[13][512:]
    prompts[14] = prompts[2][:600] + prompts[14][600:]
    new = [40, 8, 24, 30, 12, 40, 5, 16, 33, 40, 10, 21, 40, 18, 25, 9]
    arrive = [0, 0, 0, 1, 2, 2, 3, 5, 8, 8, 9, 12, 15, 40, 41, 60]
    return prompts, new, arrive, {7: 12}


INT8 = SpecConfig(method="self", budget=96, sinks=4, gamma=3, draft_weights="int8")
INT4 = SpecConfig(method="self", budget=96, sinks=4, gamma=3, draft_weights="int4")
SNAPKV = SpecConfig(method="self", drafter="snapkv", budget=128, gamma=3)  # 64 selected + a window of 64
# a self-draft with KV of its own (computed by its int8 weights) in a pool of its own
OWN = SpecConfig(method="self", budget=96, sinks=4, gamma=3, draft_weights="int8", tuning=DraftTuning(kv_source="own"))


@pytest.mark.parametrize("spec", [None, SELF, "mixed", INT8, SNAPKV, OWN],
                         ids=["plain", "self", "per-request-gamma", "self-int8", "self-snapkv", "self-own-kv"])
def test_trace_equals_each_request_alone(tiny_llm: LLM, trace: tuple, spec: object) -> None:
    prompts, new, arrive, abort = trace
    ref = alone(tiny_llm, prompts, new)
    # a pool too small for the trace (preemption), and requests that turn speculation off or fix their own γ
    blocks = 40 - 6 * (spec == SNAPKV)  # SnapKV's private blocks leave room for fewer requests at a time
    e = engine(tiny_llm, spec if isinstance(spec, SpecConfig) or spec is None else SELF, num_blocks=blocks,
               max_num_seqs=6)
    overrides = {1: 0, 4: 2, 9: 0, 11: 1} if spec == "mixed" else None
    got = run_trace(e, prompts, new, arrive, abort, overrides)
    assert set(got) == set(range(16)) - set(abort)
    for i, tokens in got.items():
        assert tokens == ref[i], f"request {i}"
    assert e.core.scheduler.preemptions > 0
    assert e.prefix_cache.hits > 0  # counted once per request: what admissions found (often evicted by then)
    if spec is not None:
        assert e.stats.spec.draft_tokens > 0


@pytest.mark.parametrize("drafter", ["full", "streaming"])
def test_draft_model_over_its_own_pool(tiny_llm: LLM, tiny_dir: Path, trace: tuple, drafter: str) -> None:
    """A draft model keeps its own KV in a pool indexed by the target's block tables. Drafting with the
    target's own checkpoint over the full context must accept every draft (its KV is kept exactly in step:
    prefill chunks, the pending and bonus tokens, plain steps caught up); the tokens are each request's alone."""
    prompts, new, arrive, abort = trace
    spec = SpecConfig(method="draft", draft_model=str(tiny_dir), drafter=drafter, budget=96, sinks=4, gamma=3)
    e = engine(tiny_llm, spec, num_blocks=20, max_num_seqs=8)
    got = run_trace(e, prompts, new, arrive, abort, {1: 0, 4: 2, 9: 0})
    ref = alone(tiny_llm, prompts, new)
    assert all(tokens == ref[i] for i, tokens in got.items())
    assert e.core.scheduler.preemptions > 0 and e.stats.spec.draft_tokens > 0
    if drafter == "full":
        assert e.stats.spec.acceptance_rate == 1.0


def test_engine_and_generate_equal_transformers(tiny_llm: LLM, tiny_dir: Path) -> None:
    prompts = random_prompts(3, [150, 300, 77], tiny_llm.config.vocab_size, seed=8)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    outs = engine(tiny_llm, SELF).run(prompts, params)
    hf = hf_model(tiny_dir)
    plain = tiny_llm.generate(prompts, params).outputs
    int8 = tiny_llm.generate(prompts, params, INT8)  # quantized self-drafts over the target's pages
    int4 = tiny_llm.generate(prompts, params, INT4)
    assert int8.stats.acceptance.draft_tokens > 0 and int4.stats.acceptance.draft_tokens > 0
    for p, o, s, q, q4 in zip(prompts, outs, plain, int8.outputs, int4.outputs, strict=True):
        assert o.token_ids == hf_greedy(hf, p, 20) == s.token_ids == q.token_ids == q4.token_ids


def test_seeded_sampling_does_not_depend_on_neighbours(tiny_llm: LLM, tiny_dir: Path) -> None:
    prompts = random_prompts(4, [100, 220], tiny_llm.config.vocab_size, seed=4)
    sampled = SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=30, ignore_eos=True)
    for spec in (None, SELF, SpecConfig(method="draft", draft_model=str(tiny_dir), drafter="streaming", budget=64,
                                        sinks=4, gamma=2)):
        one = engine(tiny_llm, spec).run([prompts[0]], sampled)[0].token_ids
        mixed = engine(tiny_llm, spec).run(prompts, [sampled, greedy, greedy, sampled])
        assert mixed[0].token_ids == one and len(one) == 24  # its own seeded generator, whoever runs beside it
        assert mixed[3].token_ids != one


def test_long_prompt_admission_keeps_running_requests_going(tiny_llm: LLM) -> None:
    """While a 2K-token prompt is prefilled chunk by chunk, every step gives the running requests a token."""
    short, long = random_prompts(2, [50, 2000], tiny_llm.config.vocab_size, seed=5)
    e = engine(tiny_llm, SELF, max_num_batched_tokens=160)
    a = e.add_request(short, SamplingParams(max_new_tokens=60, ignore_eos=True))
    while not any(o.request_id == a and o.num_tokens for o in e.step()):
        pass
    b = e.add_request(long, SamplingParams(max_new_tokens=4, ignore_eos=True))
    prefill_steps = 0
    while not e.core.requests[b].output:
        outs = {o.request_id: o for o in e.step()}
        assert a in outs and outs[a].new_token_ids, "the running request produced nothing this step"
        assert e.core.last_report.prefill_tokens <= CHUNK
        prefill_steps += 1
    assert prefill_steps >= 10  # the long prompt took many steps, none of them stalled the short one


def test_prefix_cache_hit_skips_the_shared_prefill(tiny_llm: LLM) -> None:
    doc = random_prompts(1, [1100], tiny_llm.config.vocab_size, seed=6)[0]
    e = engine(tiny_llm)
    first = e.run([doc + [5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    second = e.run([doc + [9, 10]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert first.metrics.cached_tokens == 0 and second.metrics.cached_tokens == 1024
    assert e.stats.prompt_tokens == 1103 + (1102 - 1024)
    assert second.token_ids == alone(tiny_llm, [doc + [9, 10]], [4])[0]
    e.check_no_leaks()


def test_an_own_kv_draft_keeps_the_prefix_cache_it_wrote(tiny_llm: LLM) -> None:
    """Speculation off then on again: prompts cached while the own-KV draft was on stay findable (its pool
    holds their KV), so a benchmark's plain and speculative runs both start warm; prompts cached while it was
    off are forgotten when it comes back (its pool has no KV of them). Tokens are plain decoding's throughout."""
    docs = random_prompts(3, [600], tiny_llm.config.vocab_size, seed=8)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = alone(tiny_llm, docs, [6] * 3)
    core = tiny_llm.core_for(docs, params, OWN, runs=3, prefill_chunk=CHUNK)
    try:
        def run(spec: SpecConfig | None, ids: list[list[int]]) -> list:
            core.set_speculation(spec)
            return tiny_llm.run(core, ids, params).outputs

        warm = run(OWN, docs[:2])
        assert [o.metrics.cached_tokens for o in warm] == [0, 0]
        assert [o.token_ids for o in run(None, docs[:2])] == want[:2]
        back = run(OWN, docs[:2])  # nothing new was cached while it was off: the prefix cache is kept
        assert [o.metrics.cached_tokens for o in back] == [512, 512] and [o.token_ids for o in back] == want[:2]
        run(None, docs[2:])  # a new prompt cached while the draft is off …
        again = run(OWN, docs)  # … empties the cache when it comes back
        assert [o.metrics.cached_tokens for o in again] == [0, 0, 0] and [o.token_ids for o in again] == want
    finally:
        core.close()


def test_abort_frees_blocks_at_once(tiny_llm: LLM) -> None:
    e = engine(tiny_llm, SELF)
    prompts = random_prompts(2, [400], tiny_llm.config.vocab_size, seed=7)
    a = e.add_request(prompts[0], SamplingParams(max_new_tokens=50, ignore_eos=True))
    b = e.add_request(prompts[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    for _ in range(6):
        e.step()
    held = e.kv_cache_usage
    e.abort_request(a)
    assert e.kv_cache_usage < held
    outs = {o.request_id: o for o in e.step()}
    assert outs[a].finished and outs[a].finish_reason == "abort"
    while e.has_unfinished_requests():
        e.step()
    assert b not in e.core.requests
    e.check_no_leaks()
    assert e.kv_cache_usage == 0.0


def test_bad_requests_are_refused_before_queueing(tiny_llm: LLM) -> None:
    e = engine(tiny_llm, SELF, num_blocks=8)
    with pytest.raises(ValueError, match="over the model's context of 4096"):
        e.add_request([5] * 4000, SamplingParams(max_new_tokens=200))
    with pytest.raises(ValueError, match=r"needs \d+ KV blocks .* but the cache holds 8"):
        e.add_request([5] * 600, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary of 384"):
        e.add_request([5, 999], SamplingParams())
    with pytest.raises(ValueError, match=r"γ must be in 0 … 3"):
        e.add_request([5, 6], SamplingParams(), spec=RequestSpec(9))
    e.add_request([5, 6], SamplingParams(), request_id="x")
    with pytest.raises(ValueError, match="request id 'x' is in use"):
        e.add_request([5, 6], SamplingParams(), request_id="x")
    assert e.num_waiting == 1
    with pytest.raises(ValueError, match="multiple of 64"):
        engine(tiny_llm, block_size=16)


def test_async_streams_share_the_engine(tiny_llm: LLM) -> None:
    prompts = random_prompts(3, [90, 200, 140], tiny_llm.config.vocab_size, seed=9)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    e = engine(tiny_llm, SELF)

    async def collect(p: list[int]) -> list[int]:
        tokens: list[int] = []
        async for out in e.generate(p, params):
            tokens += out.new_token_ids
        return tokens

    async def leave_early(p: list[int]) -> int:
        stream = e.generate(p, SamplingParams(max_new_tokens=200, ignore_eos=True))
        first = await stream.__anext__()
        await stream.aclose()  # a client that goes away: its request is aborted, its blocks freed
        return first.num_tokens

    async def main() -> list:
        return await asyncio.gather(*(collect(p) for p in prompts), leave_early(prompts[1]))

    *streams, left = asyncio.run(main())
    assert streams == alone(tiny_llm, prompts, [12] * 3) and left >= 1
    assert not e.has_unfinished_requests()
    e.check_no_leaks()


def test_stream_text_never_shows_a_stop_string(smol: LLM) -> None:
    e = engine(smol, SELF)
    params = SamplingParams(max_new_tokens=60, stop=("Paris",))
    deltas = list(e.stream("Question: What is the capital of France? Answer:", params))
    final = deltas[-1]
    assert "".join(d.new_text for d in deltas) == final.text
    assert "Paris" not in final.text and final.finish_reason == "stop"
    assert all("Par" not in d.new_text for d in deltas)
    assert final.token_ids == smol.generate(["Question: What is the capital of France? Answer:"],
                                            params).outputs[0].token_ids


def test_block_pool_prefix_chain_and_eviction() -> None:
    pool = BlockPool(4, 2)
    h = chain_hashes([1, 2, 3, 4, 5], 2)
    assert len(h) == 2 and chain_hashes([9, 2, 3, 4], 2)[1] != h[1]  # a block's hash covers its whole prefix
    a = pool.allocate(3)
    pool.register(a[0], h[0])
    pool.register(a[1], h[1])
    pool.release(a)
    assert pool.num_free == 4 and pool.usage == 0.0
    assert pool.match(h, 2) == a[:2]  # still cached after release
    pool.release(a[:2])
    pool.allocate(4)  # reuse evicts them
    assert pool.match(h, 2) == []
    with pytest.raises(MemoryError):
        pool.allocate(1)


def test_smollm2_real_text_trace(smol: LLM) -> None:
    """The built-in model on passages of two novels: speculative continuous batching (γ auto) gives each
    request's plain tokens, alone."""
    from magicdec import Auto
    from magicdec.bench.corpora import load_corpus, make_prompts

    corpus = load_corpus("austen")
    prompts = make_prompts(smol.tokenizer, corpus, lengths=[700, 1300, 400, 900], seed=21)
    lengths = [24, 16, 32, 20]
    ref = alone(smol, prompts, lengths)
    e = engine(smol, SpecConfig(method="self", budget=192, sinks=4, gamma=Auto()), max_num_seqs=3)
    got = run_trace(e, prompts, lengths, [0, 0, 3, 6], {})
    assert [got[i] for i in range(4)] == ref
    assert [len(t) for t in ref] == lengths


def test_paged_snapkv_keeps_the_positions_snapkv_picks(tiny_llm: LLM, tiny_dir: Path) -> None:
    """The engine's SnapKV selection over the paged cache copies, per layer and KV head, the keys and values
    of the positions SnapKV's rule picks from transformers' own attention probabilities (the prompt's last 32
    queries, summed over them and over each KV group's query heads, averaged over 7 neighbours; the best 128
    before the recent window of 64); the draft's view reads them (always visible) and then its window."""
    from transformers import AutoModelForCausalLM

    from magicdec.spec.snapkv import top_positions

    prompt = random_prompts(1, [500], tiny_llm.config.vocab_size, seed=8)[0]
    e = engine(tiny_llm, SpecConfig(method="self", drafter="snapkv", budget=192, gamma=2), num_blocks=24)
    rid = e.add_request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    while e.core.requests[rid].output == []:
        e.step()
    r = e.core.requests[rid]
    assert len(r.kept) == 2 and r.kept_slots == 128  # 192 - a window of 64, in 2 private blocks
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        probs = torch.stack(hf(torch.tensor([prompt]), output_attentions=True).attentions)  # [L, 1, Hq, S, S]
    L, _, Hq, S, _ = probs.shape
    Hkv = tiny_llm.config.n_kv_heads
    votes = probs[:, 0, :, -32:].sum(2).view(L, Hkv, Hq // Hkv, S).sum(2)  # [L, Hkv, S]
    votes = torch.nn.functional.avg_pool1d(votes, 7, stride=1, padding=3, count_include_pad=False)
    pos, valid = top_positions(votes[:, None], torch.tensor([500 - 64]), 128)
    assert bool(valid.all())
    pool, P = e.core.cache, e.core.cache.block_size
    keys = torch.cat([pool.k[:, b] for b in r.blocks], 2)[:, :, :500]  # the prompt's keys [L, H, 500, D]
    kept_k = torch.cat([pool.k[:, b] for b in r.kept], 2)[:, :, :128]  # [L, H, 128, D]
    want = keys.gather(2, pos[:, 0, :, :, None].expand(-1, -1, -1, keys.shape[-1]))
    same = (kept_k - want).abs().amax(-1) < 1e-4  # per layer, head and slot: the same key
    assert same.float().mean() > 0.97, same.float().mean()  # (near-ties may order differently)
    drafter = e.core.runner.drafter
    assert drafter is not None
    view = drafter.view([r], pool.table([r.blocks]), [r.computed], [r.computed + 1])
    assert view.read is not None and view.read_pos is not None
    assert view.read[0, :2].tolist() == r.kept and view.sinks == 2 * P
    assert (view.read_pos[0, :128] == 0).all() and (view.read_pos[0, 128 : 2 * P] == -1).all()
    e.run([], None)
    while e.has_unfinished_requests():
        e.step()
    e.check_no_leaks()
