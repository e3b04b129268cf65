"""The serving engine's reliability: one request's failure ends that request only; streams are fed by one
engine-owned stepping task (no deadlock, no concurrent steps, no lost deltas when a consumer leaves); outputs
are deltas; stop strings are matched on the incremental text; prefix-cache accounting is counted once; a
switch to a draft model never reads draft KV that was never written; prefix hits stay bit-exact whatever
prefill_chunk; every tensor-parallel rank sizes the same pool; bad arguments get one line naming them."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import magicdec.engine.runner as runner_module
import magicdec.runtime.sampling as sampling_module
import magicdec.spec.draft as draft_module
from conftest import random_prompts, spawn_ranks, tiny_config, write_checkpoint
from magicdec import LLM, DraftTuning, Engine, SamplingParams, SpecConfig
from magicdec.cache.memory import prefill_transient_bytes
from magicdec.engine.outputs import Acceptance, RunStats, StepOutput
from magicdec.llm import PromptError
from magicdec.parallel.tp import RankZeroGamma, TensorParallel

CHUNK = 128
SELF = SpecConfig(method="self", budget=96, sinks=4, gamma=3)
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def engine(llm: LLM, spec: SpecConfig | None = None, **kw: object) -> Engine:
    opts = dict(prefill_chunk=CHUNK, max_num_batched_tokens=256, quiet=True)
    return Engine(llm=llm, spec=spec, **{**opts, **kw})  # type: ignore[arg-type]


def alone(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    e = engine(llm)
    return [e.run([p], params)[0].token_ids for p in prompts]


def drain(e: Engine) -> dict[str, StepOutput]:
    final: dict[str, StepOutput] = {}
    while e.has_unfinished_requests():
        for out in e.step():
            if out.finished:
                final[out.request_id] = out
    return final


# ---- #1: tiny temperatures, and a request's failure is its own --------------------------------------------------
def test_temperature_below_epsilon_is_greedy(tiny_llm: LLM) -> None:
    prompt = random_prompts(1, [60], tiny_llm.config.vocab_size, seed=1)[0]
    tiny = SamplingParams(max_new_tokens=12, temperature=1e-45, seed=0, ignore_eos=True)
    assert tiny.greedy and not SamplingParams(temperature=1e-5).greedy
    e = engine(tiny_llm, SELF)
    out = e.run([prompt], tiny)[0]
    assert out.finish_reason == "length" and out.token_ids == alone(tiny_llm, [prompt])[0]


@pytest.mark.parametrize("where", ["first-token", "draft-or-decode", "stop-rules"])
@pytest.mark.parametrize("spec", [None, SELF], ids=["plain", "self"])
def test_one_requests_failure_ends_that_request_only(tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch, where: str,
                                                     spec: SpecConfig | None) -> None:
    """A sampled request whose own sampling raises (at its first token, or later while drafting or
    decoding), or whose stop rules raise, ends with finish_reason "error" and the message; the greedy
    requests beside it give their tokens alone, its blocks are freed, the engine takes new requests."""
    prompts = random_prompts(4, [90, 150, 40, 200], tiny_llm.config.vocab_size, seed=2)
    e = engine(tiny_llm, spec, max_num_seqs=4)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    ids = [e.add_request(p, sampled if i == 1 else GREEDY) for i, p in enumerate(prompts)]
    bad = e.core.requests[ids[1]]
    calls = {"n": 0}
    if where == "stop-rules":
        real = bad.text.add

        def add(token: int, search: bool = True) -> bool:
            calls["n"] += 1
            if calls["n"] == 4:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken byte")
            return real(token, search)

        bad.text.add = add  # type: ignore[method-assign]
    else:
        fail_at = 1 if where == "first-token" else 3
        real_sample = sampling_module.sample

        def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            if generator is bad.generator:
                calls["n"] += 1
                if calls["n"] >= fail_at:
                    raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
            return real_sample(probs, generator)

        for module in (sampling_module, runner_module, draft_module):  # first tokens; plain and verify; drafts
            monkeypatch.setattr(module, "sample", sample)
    final = drain(e)
    failed = final[ids[1]]
    assert failed.finish_reason == "error" and failed.finished
    assert failed.error is not None and ("nan" in failed.error or "broken byte" in failed.error)
    ref = alone(tiny_llm, [prompts[i] for i in (0, 2, 3)])
    assert [final[ids[i]].token_ids for i in (0, 2, 3)] == ref
    assert all(final[ids[i]].finish_reason == "length" for i in (0, 2, 3))
    assert e.stats.errors == 1 and e.stats.finished == 3
    e.check_no_leaks()
    assert e.run([prompts[0]], GREEDY)[0].token_ids == ref[0]  # the engine goes on


def test_an_engine_wide_fault_propagates(tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine(tiny_llm)
    e.add_request([5, 6, 7], GREEDY)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(e.core.model, "forward", broken)
    with pytest.raises(RuntimeError, match="the device is gone"):
        e.step()


# ---- #2, #3: one stepping task feeds every generate stream ------------------------------------------------------
async def collect(e: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    """A generate stream's tokens, checking its deltas add up to the final output."""
    tokens: list[int] = []
    async for out in e.generate(prompt, params):
        tokens += out.new_token_ids
        if out.finished:
            assert tokens == out.token_ids
    return tokens


def test_generate_with_one_seat_and_two_consumers_does_not_deadlock(tiny_llm: LLM) -> None:
    prompts = random_prompts(2, [80, 120], tiny_llm.config.vocab_size, seed=3)
    e = engine(tiny_llm, SELF, max_num_seqs=1, max_num_batched_tokens=256)

    async def main() -> list[list[int]]:
        # a guard against a hang (the defect), not a timing assertion
        return await asyncio.wait_for(asyncio.gather(*(collect(e, p) for p in prompts)), timeout=600)

    assert asyncio.run(main()) == alone(tiny_llm, prompts)
    e.check_no_leaks()


def test_cancelling_a_consumer_neither_steps_twice_at_once_nor_starves_the_others(tiny_llm: LLM) -> None:
    """Consumer C is cancelled while a step runs; A and B, which arrive during that step, still get every
    delta (their tokens alone), no second step ever starts while one runs, C's request is aborted."""
    prompts = random_prompts(3, [70, 110, 90], tiny_llm.config.vocab_size, seed=4)
    e = engine(tiny_llm, SELF)
    real_step = e.core.step
    running = threading.Lock()
    overlapped = threading.Event()
    calls = {"n": 0}
    hooks: dict[str, object] = {}

    def step() -> list[StepOutput]:
        if not running.acquire(blocking=False):
            overlapped.set()
            running.acquire()
        try:
            calls["n"] += 1
            if calls["n"] == 2:  # C is being served: cancel it now, and give a second step the chance to start
                done = threading.Event()
                hooks["loop"].call_soon_threadsafe(lambda: (hooks["cancel"](), hooks["started"].set(), done.set()))
                done.wait()
                overlapped.wait(timeout=2.0)
            return real_step()
        finally:
            running.release()

    e.core.step = step  # type: ignore[method-assign]
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)

    async def main() -> list[list[int]]:
        hooks["loop"] = asyncio.get_running_loop()
        hooks["started"] = asyncio.Event()
        c = asyncio.create_task(collect(e, prompts[2], long))
        hooks["cancel"] = c.cancel
        await hooks["started"].wait()
        ab = await asyncio.gather(collect(e, prompts[0]), collect(e, prompts[1]))
        with pytest.raises(asyncio.CancelledError):
            await c
        return ab

    assert asyncio.run(main()) == alone(tiny_llm, prompts[:2])
    assert not overlapped.is_set()
    assert not e.has_unfinished_requests() and e.stats.aborted == 1
    e.check_no_leaks()


def test_the_stepping_task_restarts_after_going_idle(tiny_llm: LLM) -> None:
    prompt = random_prompts(1, [50], tiny_llm.config.vocab_size, seed=5)[0]
    e = engine(tiny_llm)

    async def once() -> list[int]:
        return [t async for out in e.generate(prompt, GREEDY) for t in out.new_token_ids]

    async def main() -> tuple[list[int], list[int]]:
        first = await once()
        await asyncio.sleep(0)
        assert e._stepper is not None and e._stepper.done()  # it ended with no request left
        return first, await once()

    first, second = asyncio.run(main())
    assert first == second == alone(tiny_llm, [prompt])[0]


# ---- #14: a stream closed early aborts its request -----------------------------------------------------------------
def test_stream_closed_early_aborts_its_request(tiny_llm: LLM) -> None:
    e = engine(tiny_llm, SELF)
    prompt = random_prompts(1, [300], tiny_llm.config.vocab_size, seed=6)[0]
    stream = e.stream(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True))
    first = next(stream)
    assert not first.finished and e.kv_cache_usage > 0
    stream.close()
    assert not e.has_unfinished_requests() and e.kv_cache_usage == 0.0
    for _out in e.stream(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True)):
        break
    assert not e.has_unfinished_requests()
    e.check_no_leaks()


# ---- #15: outputs are deltas ---------------------------------------------------------------------------------------
def test_unfinished_outputs_carry_only_their_delta(smol: LLM) -> None:
    e = engine(smol, SELF)
    outs = list(e.stream("Once upon a time", SamplingParams(max_new_tokens=40, ignore_eos=True)))
    *running, final = outs
    assert running and all(o.token_ids == [] and o.text == "" for o in running)
    assert [o.num_tokens for o in outs] == [sum(len(x.new_token_ids) for x in outs[: i + 1]) for i in range(len(outs))]
    assert final.token_ids == [t for o in outs for t in o.new_token_ids] and len(final.token_ids) == 40
    assert final.text == "".join(o.new_text for o in outs) == smol.tokenizer.decode(final.token_ids)


# ---- #6, #16: stop strings on the incremental text ---------------------------------------------------------------
EMOJI = "🎉🎈🎂🎁🎊🥳🍰🕯️✨"  # 9 characters of several tokens each


def test_emoji_stop_string_is_found(smol: LLM) -> None:
    """A stop string of 9 emoji (many more tokens than characters) ends the request where it starts."""
    from magicdec.engine.request import Request

    tok = smol.tokenizer
    text = "Happy birthday! " + " ".join(["party"] * 40) + " " + EMOJI + " and more words after it"
    ids = tok.encode(text)
    assert len(tok.encode(EMOJI)) > len(EMOJI) + 16  # beyond what a tail counted in characters would decode
    params = SamplingParams(max_new_tokens=len(ids), stop=("never there", EMOJI))
    r = Request("r", [1], params, set(), tok, None)
    r.append(ids, 0.0)
    assert r.finish_reason == "stop" and len(r.output) < len(ids)
    final = r.delta()
    assert final.text == text[: text.index(EMOJI)] and final.finished
    assert final.token_ids == r.output and tok.decode(r.output).startswith(final.text)


def test_stop_search_covers_only_the_new_text(smol: LLM) -> None:
    """Each token's search looks at the text it completed and the last max(len(stop)) - 1 characters before
    it: never at the output so far, however long."""
    from magicdec.engine.request import TextStream

    tok = smol.tokenizer
    ids = tok.encode(" ".join(f"word{i}" for i in range(3000)))
    stops = ("zz" * 20, "qq" * 3)
    ts = TextStream(tok, stops)
    widest = 0
    for t in ids:
        before = ts.chars
        ts.add(t)
        widest = max(widest, len(ts.tail))
        assert ts.chars - before < 40
    assert widest == 39 and ts.end is None and ts.text() == tok.decode(ids)
    assert len(ts.pending) == ts.chars  # nothing taken yet; `take` hands it out up to the held-back tail
    assert ts.take(False) == tok.decode(ids)[: ts.chars - 39] and len(ts.pending) == 39


# ---- #9, #10: prefix-cache accounting once per request -----------------------------------------------------------
def test_prefix_lookups_and_cached_tokens_count_once(tiny_llm: LLM) -> None:
    """B waits many steps for room and is preempted: its lookup counts once, and its own recomputed blocks
    are no cache hit."""
    a, b, c = random_prompts(3, [200, 200, 200], tiny_llm.config.vocab_size, seed=7)
    e = engine(tiny_llm, num_blocks=9, max_num_seqs=3)
    params = SamplingParams(max_new_tokens=250, ignore_eos=True)
    ids = [e.add_request(p, params) for p in (a, b, c)]
    final = drain(e)
    assert e.core.scheduler.preemptions > 0
    assert any(final[i].metrics.preemptions for i in ids)
    assert all(final[i].metrics.cached_tokens == 0 for i in ids)
    assert e.prefix_cache.queries == 600 and e.prefix_cache.hits == 0
    e.check_no_leaks()


# ---- #12: a switch to a draft model starts a fresh prefix cache --------------------------------------------------
def test_switch_to_a_draft_model_keeps_its_acceptance(tiny_llm: LLM, tiny_dir: Path) -> None:
    prompt = random_prompts(1, [300], tiny_llm.config.vocab_size, seed=8)[0]
    draft = SpecConfig(method="draft", draft_model=str(tiny_dir), drafter="full", gamma=3)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    fresh = engine(tiny_llm, draft)
    fresh.run([prompt], params)
    switched = engine(tiny_llm)
    switched.run([prompt], params)  # fills the prefix cache, without draft KV
    switched.set_spec(draft)
    out = switched.run([prompt], params)[0]
    assert out.spec.acceptance_rate == fresh.stats.spec.acceptance_rate == 1.0
    switched.check_no_leaks()
    switched.close()
    drafter = switched.core.runner.drafter
    assert drafter is not None and drafter.pool is not None
    assert drafter.pool.k.numel() == 0 and switched.core.cache.k.numel() == 0  # close() frees both


# ---- #13: prefix hits are bit-exact whatever prefill_chunk ------------------------------------------------------
def test_prefix_hits_stay_bit_exact_with_a_chunk_not_dividing_blocks(tiny_llm: LLM) -> None:
    """prefill_chunk 80 against blocks of 64: a hit ends where a chunk and a block both end (a multiple of
    320), so the prompt's KV is that of the prompt prefilled alone, bit for bit (a hit of 64 tokens would
    leave the chunk [64, 80) to a decode-shaped forward: keys off by 1e-6)."""
    base, other, third = random_prompts(3, [400, 400, 400], tiny_llm.config.vocab_size, seed=9)
    near = base[:130] + other[130:]  # 2 cached blocks (128 tokens), on no common boundary: no hit
    far = base[:330] + third[330:]  # 5 cached blocks: 320 tokens, a chunk and a block boundary
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)

    def kv(e: Engine, prompt: list[int]) -> tuple[torch.Tensor, int]:
        rid = e.add_request(prompt, params)
        r = e.core.requests[rid]
        while not r.output:
            e.step()
        k = torch.cat([e.core.cache.k[:, b] for b in r.blocks], 2)[:, :, : len(prompt)].clone()
        cached = r.metrics.cached_tokens
        drain(e)
        return k, cached

    e = engine(tiny_llm, prefill_chunk=80, max_num_batched_tokens=300)
    kv(e, base)
    for prompt, hit in ((near, 0), (far, 320)):
        k, cached = kv(e, prompt)
        ref, _ = kv(engine(tiny_llm, prefill_chunk=80, max_num_batched_tokens=300), prompt)
        assert torch.equal(k, ref) and cached == hit, (cached, (k - ref).abs().max())
    e.check_no_leaks()


# ---- #5 (then), issue 25 (now): a sliding-window model serves prompts past its window --------------------------------
def test_sliding_window_prompts_past_the_window_are_served(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "sw", tiny_config(n_layers=1))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 256, "model_type": "mistral",
                                                  "architectures": ["MistralForCausalLM"]}))
    llm = LLM(path, device="cpu")
    assert llm.config.sliding_window == 256 and llm.config.layer_windows == (256,)
    assert len(llm.generate([[5] * 250], SamplingParams(max_new_tokens=10)).outputs[0].token_ids) == 10
    e = engine(llm)
    e.add_request([5] * 250, SamplingParams(max_new_tokens=10))
    assert len(drain(e)) == 1


# ---- #18: a draft's window covers what it catches up on ---------------------------------------------------------
@pytest.mark.parametrize("draft", ["draft-model", "self-own-kv"])
def test_draft_catch_up_reads_its_whole_window(tiny_llm: LLM, tiny_dir: Path, draft: str) -> None:
    """A request that decodes plainly for 100 steps, then speculates with a StreamingLLM draft of its own KV (a
    draft model, or the self-draft with `kv_source="own"`): the draft catches up on those 100 positions, each
    reading its own window; its KV equals that of a draft fed round by round from the start."""
    prompt = random_prompts(1, [100], tiny_llm.config.vocab_size, seed=10)[0]
    window = dict(drafter="streaming", budget=64, sinks=4, gamma=2)
    spec = (SpecConfig(method="draft", draft_model=str(tiny_dir), **window) if draft == "draft-model" else
            SpecConfig(method="self", tuning=DraftTuning(kv_source="own"), **window))
    params = SamplingParams(max_new_tokens=140, ignore_eos=True)

    def draft_kv(lag: int) -> torch.Tensor:
        e = engine(tiny_llm, spec)
        steps = {"n": 0}
        policy = e.core.policy
        assert policy is not None
        chosen = policy.choose

        def choose(rows: list) -> list[int]:
            steps["n"] += 1
            return [0] * len(rows) if steps["n"] <= lag else chosen(rows)

        policy.choose = choose  # type: ignore[method-assign]
        rid = e.add_request(prompt, params)
        r = e.core.requests[rid]
        while r.draft_seen < 205:
            assert not r.finished
            e.step()
        pool = e.core.runner.drafter.pool
        k = torch.cat([pool.k[:, b] for b in r.blocks], 2)[:, :, :205].clone()
        drain(e)
        return k

    lagged, in_step = draft_kv(100), draft_kv(0)
    assert torch.allclose(lagged, in_step, atol=1e-4), (lagged - in_step).abs().max()


def threshold_worker(rank: int, world: int, result: str) -> None:
    class Policy:
        def choose(self, batch: object) -> int:
            return 2

        def token_threshold(self, gamma: int) -> float | None:
            return 0.25 if rank == 0 else None

    shared = RankZeroGamma(Policy(), TensorParallel(rank, world), torch.device("cpu"))
    torch.save([shared.token_threshold(2), shared.token_threshold(2)], f"{result}.{rank}")


def test_every_rank_trims_gamma_with_rank_zeros_threshold(tmp_path: Path) -> None:
    spawn_ranks(threshold_worker, 2, str(tmp_path / "t"), timeout_s=60)
    assert [torch.load(tmp_path / f"t.{r}") for r in range(2)] == [[0.25, 0.25]] * 2


# ---- #4: every rank's pool holds the same number of blocks --------------------------------------------------------
def pool_worker(rank: int, world: int, path: str, result: str) -> None:
    from magicdec.cache.paged import PagedKVCache

    llm = LLM(path, device="cpu", tp=TensorParallel(rank, world))
    per_block = PagedKVCache.bytes_per_block(llm.model, 64)
    transient = prefill_transient_bytes(llm.model, 1, llm.prefill_chunk, 1024)
    # unequal memory: rank 0 has room for 100 blocks, rank 1 for 60 (the default path: no num_blocks)
    llm.memory_budget = llm.models.memory_plan().total + transient + (100 - 40 * rank) * per_block
    core = llm.core(llm.engine_config(None, max_num_seqs=8, max_model_len=1024))
    torch.save(core.cache.num_blocks, f"{result}.{rank}")


def test_tensor_parallel_ranks_agree_on_the_pool(tiny_dir: Path, tmp_path: Path) -> None:
    spawn_ranks(pool_worker, 2, str(tiny_dir), str(tmp_path / "n"), timeout_s=120)
    assert [torch.load(tmp_path / f"n.{r}") for r in range(2)] == [60, 60]


# ---- the Python API: wrong types get one line naming the argument -------------------------------------------------
def test_wrong_argument_types_are_named(tiny_llm: LLM) -> None:
    e = engine(tiny_llm)
    cases = [
        (lambda: tiny_llm.generate([b"bytes"]), PromptError, r"prompt 0 is bytes: decode it"),
        (lambda: tiny_llm.generate(b"bytes"), PromptError, r"prompts must be a list"),
        (lambda: tiny_llm.generate([[5, 6.0, 7]]), PromptError, r"prompt 0 has a float at position 1"),
        (lambda: tiny_llm.generate([[5, True]]), PromptError, r"prompt 0 has a bool at position 1"),
        (lambda: tiny_llm.generate([[[5, 6]]]), PromptError, r"prompt 0 has a list at position 0"),
        (lambda: tiny_llm.generate([5, 6]), PromptError, r"prompt 0 must be a str or a list of int"),
        (lambda: tiny_llm.generate(["hi"], spec="self"), TypeError, r"spec must be a SpecConfig .*got str: 'self'"),
        (lambda: tiny_llm.generate(["hi"], params={"max_new_tokens": 4}), TypeError,
         r"params must be a SamplingParams .*got dict"),
        (lambda: e.add_request(b"bytes"), PromptError, r"prompt 0 is bytes"),
        (lambda: e.add_request([5, 6], {"max_new_tokens": 4}), TypeError, r"params must be a SamplingParams"),
        (lambda: e.add_request([5, 6], spec=True), TypeError, r"spec must be a RequestSpec"),
        (lambda: Engine(llm=tiny_llm, spec="self", quiet=True), TypeError, r"spec must be a SpecConfig"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert e.num_waiting == 0
    assert tiny_llm.encode([torch.tensor([5, 6]), np.array([7, 8])]) == [[5, 6], [7, 8]]
    with pytest.raises(PromptError, match="prompt 0 must be a str or a list of int"):
        tiny_llm.encode([np.array([5.0, 6.0])])


def test_acceptance_is_none_when_nothing_was_drafted() -> None:
    assert Acceptance().acceptance_rate is None
    stats = RunStats(method="self")
    assert stats.acceptance_rate is None and stats.to_dict()["acceptance_rate"] is None
    a = Acceptance()
    a.record(2, 1)
    assert a.acceptance_rate == 0.5
