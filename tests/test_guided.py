"""Verification-guided KV selection (`drafter="guided"`): the kernel's block scores, the selection of the
draft's blocks, and exactness of the engine with the guided self-draft (greedy tokens equal each request
decoded alone with plain decoding)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.engine.core import guided_blocks
from magicdec.kernels import cpu
from magicdec.spec.config import DraftTuning


def paged_problem(B: int, Hq: int, Hkv: int, T: int, nb: int, P: int, D: int, seed: int,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    N = B * nb + 3
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = (2 * torch.randn(N, Hkv, P, D, generator=g)).to(dtype)
    v = torch.randn(N, Hkv, P, D, generator=g).to(dtype)
    table = torch.randperm(N, generator=g)[: B * nb].view(B, nb).int()
    S = nb * P
    lens = torch.randint(1, S + 1, (B,), generator=g)
    pos = lens[:, None] - T + torch.arange(T)  # causal over a ragged length, some holes, a row that sees nothing
    slot = torch.arange(S)
    allowed = (slot <= pos[..., None]) & (torch.rand(B, T, S, generator=g) > 0.2)
    allowed[0, 0] = False
    return q, k, v, table, allowed


@pytest.mark.parametrize("shape", [(1, 4, 2, 4, 12, 64, 64), (6, 8, 2, 3, 3, 128, 32), (2, 6, 3, 1, 20, 64, 128)],
                         ids=["split", "heads-page128", "d128"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_block_scores_match_reference_and_keep_output(kernels: None, threads: None, shape: tuple,
                                                       nthreads: int) -> None:
    torch.set_num_threads(nthreads)
    B, Hq, Hkv, T, nb, P, D = shape
    q, k, v, table, allowed = paged_problem(B, Hq, Hkv, T, nb, P, D, seed=sum(shape))
    plain = cpu.paged_attention(q, k, v, table, allowed)
    scores = torch.zeros(B, nb)
    out = cpu.paged_attention(q, k, v, table, allowed, block_scores=scores)
    assert torch.equal(out, plain)  # bitwise unchanged
    ref = cpu.block_scores_reference(q, cpu.gather_pages(k, table), allowed, P)
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-6)
    assert (scores > 0).any() and (ref == 0).eq(scores == 0).all()
    # deterministic, and max-accumulated into what the buffer holds
    again = torch.full((B, nb), 0.5)
    cpu.paged_attention(q, k, v, table, allowed, block_scores=again)
    assert torch.equal(again, torch.maximum(scores, torch.full_like(scores, 0.5)))


def test_block_scores_bf16_and_fallback(kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, table, allowed = paged_problem(2, 4, 2, 2, 6, 64, 64, seed=11, dtype=torch.bfloat16)
    scores = torch.zeros(2, 6)
    cpu.paged_attention(q, k, v, table, allowed, block_scores=scores)
    ref = cpu.block_scores_reference(q.float(), cpu.gather_pages(k, table).float(), allowed, 64)
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")  # the PyTorch path gives the same scores
    fb = torch.zeros(2, 6)
    cpu.paged_attention(q.float(), k.float(), v.float(), table, allowed, block_scores=fb)
    torch.testing.assert_close(fb, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="block_scores"):
        cpu.paged_attention(q, k, v, table, allowed, block_scores=torch.zeros(2, 5))


def test_guided_blocks_selection() -> None:
    scores = [0.9, 0.1, 0.7, 0.05, 0.7, 0.3, 0.2, 0.99, 0.99]
    # window from block 7: candidates 1..6; the best: 2 and 4 (tied 0.7: both), then 5
    assert guided_blocks(scores, first=7, select=3) == [0, 2, 4]
    assert guided_blocks(scores, first=7, select=4) == [0, 2, 4, 5]
    assert guided_blocks(scores, first=3, select=4) == [0, 1, 2]  # fewer candidates than room
    assert guided_blocks(scores, first=0, select=3) == []  # the window covers block 0
    assert guided_blocks([], first=6, select=3) == [0, 4, 5]  # no scores yet: the most recent ones
    assert guided_blocks([0.0, 0.5], first=5, select=3) == [0, 1, 4]  # unscored blocks count 0, ties to recent


def test_guided_view_reads_top_blocks(tiny_llm: LLM) -> None:
    e = Engine(llm=tiny_llm, spec=SpecConfig(method="self", drafter="guided", budget=256, gamma=2),
               prefill_chunk=128, max_num_batched_tokens=256, quiet=True)
    core = e.core
    assert core.draft is not None and core.draft.select == 3 and core.draft.window == 64
    prompt = random_prompts(1, [700], tiny_llm.config.vocab_size, seed=21)[0]
    rid = e.add_request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    while not core.block_scores.get(rid):
        e.step()
    r = core.requests[rid]
    scores = core.block_scores[rid]
    assert len(scores) == len(r.blocks) and scores[0] > 0
    first = (r.computed - 64 + 1) // 64
    want = guided_blocks(scores, first, 3)
    assert len(want) == 3
    view = core._draft_view([r], [2], core._table([r]))
    assert view.sinks == 3 * 64 and view.window == 64
    assert view.read is not None and view.read_pos is not None
    assert view.read[0, :3].tolist() == [r.blocks[c] for c in want]
    assert view.read_pos[0, ::64].tolist()[:3] == [c * 64 for c in want]
    e.close()


def test_guided_config_checks(tiny_llm: LLM) -> None:
    with pytest.raises(ValueError, match="method 'self'"):
        SpecConfig(method="draft", draft_model="x", drafter="guided")
    with pytest.raises(ValueError, match="budget"):
        Engine(llm=tiny_llm, spec=SpecConfig(method="self", drafter="guided", budget=100), quiet=True)


@pytest.mark.parametrize("layers", ["max", "sum"])
def test_guided_trace_equals_each_request_alone(tiny_llm: LLM, layers: str) -> None:
    """Greedy tokens of a staggered trace (prompts 100–700, a pool small enough to preempt, per-request γ
    overrides) with the guided self-draft equal each request decoded alone with plain decoding."""
    lens = [300, 700, 129, 513, 260, 650, 100, 384]
    new = [40, 32, 24, 40, 30, 24, 40, 24]
    arrive = [0, 0, 0, 1, 2, 3, 5, 8]
    prompts = random_prompts(len(lens), lens, tiny_llm.config.vocab_size, seed=31)
    opts = dict(prefill_chunk=128, max_num_batched_tokens=256, quiet=True)
    plain = Engine(llm=tiny_llm, **opts)  # type: ignore[arg-type]
    ref = [plain.run([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids
           for p, n in zip(prompts, new)]
    spec = SpecConfig(method="self", drafter="guided", budget=192, sinks=4, gamma=3,
                      tuning=DraftTuning(guided_scores=layers))
    e = Engine(llm=tiny_llm, spec=spec, num_blocks=14, max_num_seqs=6, **opts)  # type: ignore[arg-type]
    ids: dict[str, int] = {}
    done: dict[int, list[int]] = {}
    step = 0
    while len(done) < len(prompts):
        for i, a in enumerate(arrive):
            if a == step:
                override = {2: 0, 5: 1}.get(i)
                ids[e.add_request(prompts[i], SamplingParams(max_new_tokens=new[i], ignore_eos=True),
                                  override)] = i
        for out in e.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
        step += 1
        assert step < 2000
    for i, tokens in done.items():
        assert tokens == ref[i], f"request {i}"
    assert e.stats.spec.draft_tokens > 0 and e.stats.spec.acceptance_rate > 0
    assert e.core.scheduler.preemptions > 0
    assert not e.core.block_scores  # dropped with the finished requests
    e.check_no_leaks()


def test_block_scores_pooled_over_layers(tiny_llm: LLM) -> None:
    """A verification-shaped forward over pages: `score_layers="sum"` adds each layer's block scores (the max
    over its heads and tokens), "max" keeps the largest over layers; the forward's outputs are the same."""
    from magicdec.cache.paged import PagedKVCache, PagedView

    model = tiny_llm.model
    cache = PagedKVCache.for_model(model, 12, 64)
    table = cache.table([[3, 7, 1, 9, 0]])
    prompt = torch.tensor([random_prompts(1, [300], tiny_llm.config.vocab_size, seed=5)[0]])
    model(prompt, torch.arange(300)[None], PagedView(cache, table))
    ids, pos = prompt[:, -4:], torch.arange(300, 304)[None]
    out = {}
    for mode in ("max", "sum"):
        buf = torch.zeros(table.shape)
        out[mode] = model(ids, pos, PagedView(cache, table, scores=buf, score_layers=mode)), buf
    assert torch.equal(out["max"][0], out["sum"][0])
    top, total = out["max"][1], out["sum"][1]
    assert (top > 0).any() and (total > top).any() and (total >= top).all()
    assert (total <= model.config.n_layers * top + 1e-6).all()  # each layer's max is at most the overall max
    with pytest.raises(ValueError, match="score_layers"):
        PagedView(cache, table, scores=torch.zeros(table.shape), score_layers="mean")
    with pytest.raises(ValueError, match="guided_scores"):
        DraftTuning(guided_scores="mean")


def test_paged_step_scores_with_and_without_kernel(kernels: None) -> None:
    """A view's `scores` are the same through the kernel and through the gather + float64 path."""
    from magicdec.cache.paged import PagedKVCache, PagedView

    g = torch.Generator().manual_seed(5)
    cache = PagedKVCache(1, 8, 2, 64, 64, 2, torch.float32, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    table = torch.tensor([[3, 1, 5], [2, 6, 0]])
    positions = torch.tensor([[150, 151, 152], [70, 71, -1]])
    q = torch.randn(2, 4, 3, 64, generator=g)
    k, v = torch.randn(2, 2, 3, 64, generator=g), torch.randn(2, 2, 3, 64, generator=g)
    got = []
    for kernel in (True, False):
        scores = torch.zeros(2, 3)
        step = PagedView(cache, table, scores=scores).begin(positions)
        assert step.kernel
        step.kernel = kernel
        out = step.attend(0, q, k, v)
        got.append((out, scores))
    torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0][1], got[1][1], rtol=1e-5, atol=1e-6)
    assert got[0][1][1, 2] == 0 and (got[0][1][0] > 0).all()  # row 1 does not reach its third block
