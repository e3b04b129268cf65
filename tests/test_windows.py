"""Sliding-window release (issue 25): on a model whose layers split into global and sliding groups, a sliding
layer holds only its window's blocks — a ring per request (`PagedKVCache`'s layer groups, `Scheduler`'s
rings) — so its memory is bounded by the window, not the context. The pool's bytes on a long request, greedy
output against transformers and the no-release path with the rings wrapped (speculation included), and the
block books under random traffic with preemptions and aborts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine_fuzz import PROFILE, Req, Scenario, check_books
from test_families import write_family

from conftest import hf_greedy, random_prompts
from magicdec import LLM, DraftTuning, Engine, SamplingParams, SpecConfig
from magicdec.config import layer_groups

WINDOW = 32  # against blocks of 64 and chunks of 64: a 300-token request wraps its ring of 3 blocks


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("windows")
    out = {f: write_family(root / f, f, seed=3, sliding_window=WINDOW) for f in ("ministral", "gemma2")}
    five = ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]  # groups [1, 3], [0, 2], [4]
    out["ministral5"] = write_family(root / "ministral5", "ministral", seed=3, sliding_window=WINDOW,
                                     num_hidden_layers=5, layer_types=five)
    return out


def test_layer_groups_split_global_and_sliding_layers_evenly() -> None:
    assert layer_groups((32, 0, 32, 0)) == [[1, 3], [0, 2]]
    assert layer_groups((8, 8, 0, 8, 8, 16, 16, 0)) == [[2, 7], [0, 1], [3, 4], [5, 6]]
    assert layer_groups((32, 32, 32, 0, 0)) == [[3, 4], [0, 1], [2]]  # the last group's blocks have a free slot
    assert layer_groups((0, 0)) is None and layer_groups((32, 32)) is None  # one kind only: nothing to release
    assert layer_groups((32, 0, 0)) is None  # fewer sliding layers than global: their blocks would be mostly empty


def test_plan_counts_a_sliding_layers_window_not_its_context() -> None:
    """`magicdec plan`'s memory: Gemma-3-27B's 52 sliding layers hold their window, not 32K tokens."""
    from magicdec.costmodel.hardware import load_profile
    from magicdec.costmodel.shapes import resolve_model
    from magicdec.costmodel.steps import CostModel, DraftSpec

    gemma = resolve_model("gemma-3-27b")
    groups = gemma.layer_groups
    assert groups is not None and [len(g) for g in groups] == [10, 10, 10, 10, 10, 10, 2]
    dense = gemma.with_(layer_types=(), sliding_window=None)
    hw = load_profile("h100")
    kv = {name: CostModel(m, hw, DraftSpec("self")).memory_bytes(8, 32768) - m.weight_bytes(2)
          for name, m in (("mixed", gemma), ("dense", dense))}
    assert 0.15 < kv["mixed"] / kv["dense"] < 0.25


def held_bytes(e: Engine) -> int:
    """Bytes of the pool's blocks held by requests now."""
    cache, pool = e.core.cache, e.core.pool
    return (pool.num_blocks - pool.num_free) * (cache.nbytes // (cache.num_blocks + 1))


def test_a_long_request_holds_about_half_of_a_global_models_blocks(tmp_path: Path) -> None:
    """A 6K-token request, 512-token window, 1:1 sliding/global: at its last step the pool holds 0.45–0.6 of
    the bytes that the same model without release, and a global-only model, hold."""
    long = dict(sliding_window=512, max_position_embeddings=8192)
    mixed = LLM(write_family(tmp_path / "mixed", "ministral", **long), device="cpu")
    dense = LLM(write_family(tmp_path / "dense", "ministral", **long, layer_types=["full_attention"] * 2),
                device="cpu")
    assert mixed.config.layer_windows == (512, 0) and dense.config.layer_windows == (0, 0)
    prompt = random_prompts(1, [6144], 384, seed=1)[0]
    held, tokens = {}, {}
    for name, llm, release in (("release", mixed, True), ("kept", mixed, False), ("dense", dense, True)):
        e = Engine(llm=llm, prefill_chunk=256, max_num_batched_tokens=256, num_blocks=240, max_num_seqs=1,
                   release_windows=release, quiet=True)
        e.add_request(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
        last, out = 0, []
        while e.has_unfinished_requests():
            last = held_bytes(e)  # after the step before: the request still holds its blocks
            out += [t for o in e.step() for t in o.new_token_ids]
        e.check_no_leaks()
        held[name], tokens[name] = last, out
    assert held["kept"] == held["dense"]
    assert 0.45 <= held["release"] / held["kept"] <= 0.6, held
    assert tokens["release"] == tokens["kept"]


SPECS = {
    "streaming": SpecConfig(method="self", drafter="streaming", budget=64, sinks=4, gamma=3),
    "snapkv": SpecConfig(method="self", drafter="snapkv", budget=96, gamma=2,
                         tuning=DraftTuning(snapkv_window=16, observe=8)),
    "guided": SpecConfig(method="self", drafter="guided", budget=192, sinks=4, gamma=2,
                         tuning=DraftTuning(guided_window=64, guided_scores="layer")),
}


@pytest.mark.parametrize("family,drafter", [("ministral", "streaming"), ("gemma2", "streaming"),
                                            ("ministral5", "guided"), ("ministral", "snapkv"),
                                            ("ministral", "guided")])
def test_greedy_with_release_equals_transformers_under_speculation(family: str, drafter: str,
                                                                  mixed: dict[str, Path]) -> None:
    """Prompts far past the window (rings wrapped many times), four at once in a pool that preempts: the
    self-speculative greedy tokens with release are transformers' and the no-release path's."""
    from transformers import AutoModelForCausalLM

    path = mixed[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    llm = LLM(path, device="cpu", prefill_chunk=64)
    prompts = random_prompts(4, [300, 23, 200, 410], 384, seed=11)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    outs = {}
    for release in (True, False):
        core = llm.core(llm.engine_config(SPECS[drafter], release_windows=release, max_num_seqs=4, num_blocks=30,
                                          max_num_batched_tokens=128, pad_shapes=release))
        assert core.scheduler.ring_sizes == ([3] * (len(core.model.config.layer_groups or []) - 1) if release else [])
        outs[release] = [o.token_ids for o in llm.run(core, prompts, params).outputs]
        core.pool.check_empty()
    assert outs[True] == outs[False]
    assert outs[True] == [hf_greedy(hf, p, 24) for p in prompts]


def test_rings_bound_admission_and_the_capacity_report(mixed: dict[str, Path]) -> None:
    """A request needs its own blocks plus a ring per sliding group (not its context again)."""
    llm = LLM(mixed["ministral"], device="cpu", prefill_chunk=64)
    e = Engine(llm=llm, prefill_chunk=64, num_blocks=20, quiet=True)
    s = e.core.scheduler
    assert s.ring_sizes == [3] and not s.config.enable_prefix_caching
    assert s.blocks_needed(1000) == 16 + 3 and s.blocks_needed(10) == 1 + 1
    assert e.core.limits.kv_capacity == (20 - 3) * 64 - 1
    with pytest.raises(ValueError, match="KV blocks"):
        e.core.check_request(list(range(3, 300)) * 4, SamplingParams(max_new_tokens=8))
    kept = Engine(llm=llm, prefill_chunk=64, num_blocks=20, release_windows=False, quiet=True).core.scheduler
    assert kept.ring_sizes == [] and kept.blocks_needed(1000) == 16 and kept.config.enable_prefix_caching


FUZZ_SPECS = {"plain": None, "self": SPECS["streaming"], "snapkv": SPECS["snapkv"]}
FUZZ_NEW = 90  # long outputs: decoding requests outgrow their blocks, so the pool preempts


@st.composite
def traffic(draw: st.DrawFn) -> Scenario:
    """Requests arriving together into a tight pool, decoding long enough to need blocks and preempt."""
    reqs = []
    for _ in range(draw(st.integers(2, 5))):
        length, seed = draw(st.integers(1, 200)), draw(st.integers(0, 1 << 16))
        prompt = tuple((seed * 7919 + i * 104729) % 381 + 3 for i in range(length))
        reqs.append(Req(prompt, draw(st.integers(20, FUZZ_NEW)), draw(st.one_of(st.none(), st.integers(0, 2))),
                        draw(st.booleans()), draw(st.integers(0, 3)), draw(st.one_of(st.none(), st.integers(0, 40)))))
    return Scenario("", draw(st.sampled_from([64, 96, 128])), draw(st.integers(2, 4)), draw(st.integers(0, 2)),
                    tuple(reqs))


@pytest.fixture(scope="module")
def mixed_llm(mixed: dict[str, Path]) -> LLM:
    return LLM(mixed["ministral"], device="cpu")


@pytest.fixture(scope="module")
def kept_reference() -> dict:
    """Prompt and prefill chunk → its greedy tokens alone without release (FUZZ_NEW of them), filled lazily."""
    return {}


def kept_alone(llm: LLM, ref: dict, prompt: tuple[int, ...], chunk: int) -> list[int]:
    if (prompt, chunk) not in ref:
        e = Engine(llm=llm, prefill_chunk=chunk, num_blocks=16, release_windows=False, quiet=True)
        out = e.run([list(prompt)], SamplingParams(max_new_tokens=FUZZ_NEW, ignore_eos=True))
        ref[prompt, chunk] = out[0].token_ids
    return ref[prompt, chunk]


@pytest.mark.parametrize("spec", sorted(FUZZ_SPECS))
@settings.get_profile(PROFILE)
@given(s=traffic())
def test_ring_books_hold_under_preemption_and_abort(mixed_llm: LLM, kept_reference: dict, spec: str,
                                                     s: Scenario) -> None:
    """Random traffic on the 1:1 model with rings (a pool small enough to preempt, aborts during prefill and
    decoding): after every step each block's references are its holders' (rings included), at the end nothing
    is held, and greedy requests decode as alone without release."""
    run_traffic(mixed_llm, kept_reference, spec, s)


@pytest.mark.parametrize("spec", sorted(FUZZ_SPECS))
def test_rings_survive_preemption(mixed_llm: LLM, kept_reference: dict, spec: str) -> None:
    """Three short prompts decoding past a block in a pool of 4 blocks (+ SnapKV's for two): the newest are preempted
    and recomputed (their rings given back and rebuilt), one is aborted, the books hold and tokens are kept."""
    prompts = [tuple((k * 31 + i * 7) % 381 + 3 for i in range(n)) for k, n in ((1, 10), (2, 30), (3, 20))]
    config = FUZZ_SPECS[spec]
    kept = -(-config.n_kept // 64) if config is not None and config.drafter == "snapkv" else 0
    s = Scenario("", 64, 3, kept, (Req(prompts[0], 90, None, False, 0, None), Req(prompts[1], 80, None, False, 0, None),
                                Req(prompts[2], 70, 1, False, 0, 50)))
    assert run_traffic(mixed_llm, kept_reference, spec, s).core.scheduler.preemptions > 0


def run_traffic(mixed_llm: LLM, kept_reference: dict, spec: str, s: Scenario) -> Engine:
    """Run scenario `s` on the 1:1 model with rings, checking the books after every step and the greedy tokens
    (those of the request alone without release) at the end."""
    config = FUZZ_SPECS[spec]
    lookahead = config.gamma_bound + 1 if config is not None else 1
    kept = -(-config.n_kept // 64) if config is not None and config.drafter == "snapkv" else 0
    ring = -(-(WINDOW + max(s.chunk, lookahead, 16)) // 64) + 1
    need = max(-(-(len(r.prompt) + r.max_new + lookahead) // 64) for r in s.requests)
    e = Engine(llm=mixed_llm, spec=config, prefill_chunk=s.chunk, max_num_batched_tokens=256,
               num_blocks=need + kept + min(ring, need) + s.spare_blocks, max_num_seqs=s.max_num_seqs, quiet=True)
    assert e.core.scheduler.ring_sizes == [ring]
    ids: dict[str, int] = {}
    final: dict[int, tuple[str, list[int]]] = {}
    step = 0
    while len(ids) < len(s.requests) or e.has_unfinished_requests():
        for i, r in enumerate(s.requests):
            if r.arrive == step:
                params = SamplingParams(max_new_tokens=r.max_new, ignore_eos=True,
                                        temperature=0.8 if r.sampled else 0.0, seed=i)
                ids[e.add_request(list(r.prompt), params, r.gamma if config is not None else None)] = i
            if r.abort is not None and r.arrive + r.abort == step:
                e.abort_request(next(k for k, v in ids.items() if v == i))
        check_books(e.core)
        for out in e.step():
            if out.finished:
                final[ids[out.request_id]] = (out.finish_reason or "", out.token_ids)
        check_books(e.core)
        step += 1
        assert step < 3000, "the engine stopped making progress"
    e.check_no_leaks()
    assert set(final) == set(range(len(s.requests)))
    for i, (reason, tokens) in final.items():
        if not s.requests[i].sampled:
            ref = kept_alone(mixed_llm, kept_reference, s.requests[i].prompt, s.chunk)
            assert tokens == ref[: len(tokens)], f"request {i} ({reason})"
    return e
