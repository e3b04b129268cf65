"""Verification-guided KV selection (`drafter="guided"`): the kernel's block scores, the selection of the
draft's blocks, and exactness of the engine with the guided self-draft (greedy tokens equal each request
decoded alone with plain decoding)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.cache.paged import PagedView
from magicdec.engine.core import EngineCore
from magicdec.engine.request import Request
from magicdec.kernels import cpu
from magicdec.spec.config import DraftTuning
from magicdec.spec.views import guided_columns


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


def guided_blocks(scores: list[float], first: int, select: int) -> list[int]:
    """The guided draft's kept columns of one row (`guided_columns`), −1 (none) dropped."""
    cols = guided_columns(torch.tensor([scores]), torch.tensor([first]), select)[0].tolist()
    return [c for c in cols if c >= 0]


def test_guided_blocks_selection() -> None:
    scores = [0.9, 0.1, 0.7, 0.05, 0.7, 0.3, 0.2, 0.99, 0.99]
    # window from block 7: candidates 1..6; the best: 2 and 4 (tied 0.7: both), then 5
    assert guided_blocks(scores, first=7, select=3) == [0, 2, 4]
    assert guided_blocks(scores, first=7, select=4) == [0, 2, 4, 5]
    assert guided_blocks(scores, first=3, select=4) == [0, 1, 2]  # fewer candidates than room
    assert guided_blocks(scores, first=0, select=3) == []  # the window covers block 0
    assert guided_blocks([0.0] * 7, first=6, select=3) == [0, 4, 5]  # no scores yet: the most recent ones
    assert guided_blocks([0.0, 0.5, 0, 0, 0, 0], first=5, select=3) == [0, 1, 4]  # unscored: 0, ties to recent


def draft_view(core: EngineCore, r: Request, gamma: int) -> PagedView:
    """The view the engine's draft reads for r's next round of `gamma` drafts."""
    drafter = core.runner.drafter
    assert drafter is not None
    return drafter.view([r], core.cache.table([r.blocks]), [r.computed], [r.computed + gamma - 1])


def scored_request(llm: LLM, tuning: DraftTuning | None = None) -> tuple[Engine, EngineCore, str, Request]:
    """A guided engine (budget 256: block 0 + 2 selected + a 64-token window) stepped until its one request of
    700 tokens has block scores from a verification."""
    spec = SpecConfig(method="self", drafter="guided", budget=256, gamma=2, tuning=tuning or DraftTuning())
    e = Engine(llm=llm, spec=spec, prefill_chunk=128, max_num_batched_tokens=256, quiet=True)
    core = e.core
    assert core.runner.drafter is not None
    setup = core.runner.drafter.setup
    assert setup.select == 3 and setup.window == 64
    prompt = random_prompts(1, [700], llm.config.vocab_size, seed=21)[0]
    rid = e.add_request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    while core.requests[rid].scores is None:
        e.step()
    return e, core, rid, core.requests[rid]


def test_guided_view_reads_top_blocks(tiny_llm: LLM) -> None:
    e, core, rid, r = scored_request(tiny_llm)
    assert r.scores is not None
    scores = r.scores.tolist()
    assert len(scores) == len(r.blocks) and scores[0] > 0
    first = (r.computed - 64 + 1) // 64
    # block 0 and the 2 best-scored blocks older than the window (ties to the more recent)
    best = sorted(range(1, first), key=lambda c: (scores[c], c), reverse=True)[:2]
    want = [0, *sorted(best)]
    assert len(want) == 3 and guided_blocks(scores, first, 3) == want
    view = draft_view(core, r, 2)
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


@pytest.mark.parametrize(("layers", "budget", "window"), [("max", 192, None), ("sum", 192, None),
                                                        ("layer", 192, None), ("layer", 320, 150), ("max", 256, 100)],
                         ids=["max", "sum", "layer", "layer-window150", "max-window100"])
def test_guided_trace_equals_each_request_alone(tiny_llm: LLM, layers: str, budget: int, window: int | None) -> None:
    """Greedy tokens of a staggered trace (prompts 100–700, a pool small enough to preempt, per-request γ
    overrides) with the guided self-draft (block scores pooled by max or sum, or per layer; the default
    window or one of its own) equal each request decoded alone with plain decoding."""
    lens = [300, 700, 129, 513, 260, 650, 100, 384]
    new = [40, 32, 24, 40, 30, 24, 40, 24]
    arrive = [0, 0, 0, 1, 2, 3, 5, 8]
    prompts = random_prompts(len(lens), lens, tiny_llm.config.vocab_size, seed=31)
    opts = dict(prefill_chunk=128, max_num_batched_tokens=256, quiet=True)
    plain = Engine(llm=tiny_llm, **opts)  # type: ignore[arg-type]
    ref = [plain.run([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids
           for p, n in zip(prompts, new)]
    spec = SpecConfig(method="self", drafter="guided", budget=budget, sinks=4, gamma=3,
                      tuning=DraftTuning(guided_scores=layers, guided_window=window))
    e = Engine(llm=tiny_llm, spec=spec, num_blocks=14, max_num_seqs=6, **opts)  # type: ignore[arg-type]
    assert e.core.runner.drafter is not None
    setup = e.core.runner.drafter.setup
    assert setup.window == (window or 64) and setup.select == (budget - (window or 64)) // 64
    assert setup.score_layers == layers
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
    with pytest.raises(ValueError, match="scores must be"):
        PagedView(cache, table, scores=torch.zeros(table.shape), score_layers="layer")
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


def test_block_scores_per_layer(tiny_llm: LLM) -> None:
    """`score_layers="layer"` keeps each layer's scores [L, B, nb]: their max over layers is the "max" pooling,
    their sum the "sum" pooling; the forward's outputs are the same."""
    from magicdec.cache.paged import PagedKVCache, PagedView

    model = tiny_llm.model
    L = model.config.n_layers
    cache = PagedKVCache.for_model(model, 12, 64)
    table = cache.table([[3, 7, 1, 9, 0], [2, 5, 4, 6, 8]])
    prompts = torch.tensor(random_prompts(2, [300, 300], tiny_llm.config.vocab_size, seed=6))
    model(prompts, torch.arange(300)[None].expand(2, -1), PagedView(cache, table))
    ids, pos = prompts[:, -3:], torch.arange(300, 303)[None].expand(2, -1)
    out = {}
    for mode in ("max", "sum", "layer"):
        buf = torch.zeros((L, *table.shape) if mode == "layer" else table.shape)
        out[mode] = model(ids, pos, PagedView(cache, table, scores=buf, score_layers=mode)), buf
    assert torch.equal(out["max"][0], out["layer"][0]) and torch.equal(out["sum"][0], out["layer"][0])
    per = out["layer"][1]
    assert torch.equal(per.amax(0), out["max"][1])
    torch.testing.assert_close(per.sum(0), out["sum"][1])
    assert not torch.equal(per[0], per[1])  # the layers attend differently


def _per_layer_case(L: int, seed: int) -> tuple:
    from magicdec.cache.paged import PagedKVCache

    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(L, 16, 2, 64, 64, 2, torch.float32, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    table = torch.tensor([[3, 1, 5, 7, 9, 11], [2, 6, 0, 4, 8, 10]])
    positions = torch.tensor([[330, 331, 332], [300, 301, -1]])
    # per layer: the sink block, one selected block (a different one per layer), then the window's block 5 / 4
    cols = [[[0, 1, 5], [0, 2, 4]], [[0, 3, 5], [0, 1, 4]]][:L]
    read = torch.stack([torch.stack([table[b, torch.tensor(c)] for b, c in enumerate(layer)]) for layer in cols])
    read_pos = torch.stack([torch.stack([(torch.tensor(c)[:, None] * 64 + torch.arange(64)).reshape(-1)
                                         for c in layer]) for layer in cols])
    q = torch.randn(2, 4, 3, 64, generator=g)
    k, v = torch.randn(2, 2, 3, 64, generator=g), torch.randn(2, 2, 3, 64, generator=g)
    return cache, table, positions, read, read_pos, q, k, v


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "gather"])
def test_per_layer_view_reads_each_layers_table(kernels: None, kernel: bool) -> None:
    """A per-layer view ([L, B, nr] tables) attends at layer l exactly as a shared view of table l does, through
    the kernel and through the gather path; a per-layer view whose layers share one table is the shared view."""
    from magicdec.cache.paged import PagedView

    cache, table, positions, read, read_pos, q, k, v = _per_layer_case(2, seed=9)
    kw = dict(window=40, sinks=128)
    outs = []
    for layer in (0, 1):
        step = PagedView(cache, table, read=read, read_pos=read_pos, **kw).begin(positions)
        step.kernel = kernel
        got = step.attend(layer, q, k, v)
        alone = PagedView(cache, table, read=read[layer], read_pos=read_pos[layer], **kw).begin(positions)
        alone.kernel = kernel
        assert torch.equal(got, alone.attend(layer, q, k, v))
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1])  # the layers read different blocks
    same = PagedView(cache, table, read=read[:1].expand(2, -1, -1), read_pos=read_pos[:1].expand(2, -1, -1),
                     **kw).begin(positions)
    shared = PagedView(cache, table, read=read[0], read_pos=read_pos[0], **kw).begin(positions)
    same.kernel = shared.kernel = kernel
    assert torch.equal(same.attend(1, q, k, v), shared.attend(1, q, k, v))
    with pytest.raises(ValueError, match="read_pos"):
        PagedView(cache, table, read=read, read_pos=read_pos[0])


def test_guided_layer_view_reads_each_layers_best_blocks(tiny_llm: LLM) -> None:
    """guided_scores="layer": verification stores per-layer scores, and the draft's view gives each layer its
    own sink block + best-scored blocks + the same window; different scores, different blocks."""
    e, core, rid, r = scored_request(tiny_llm, DraftTuning(guided_scores="layer"))
    L = tiny_llm.config.n_layers
    assert core.runner.drafter is not None and core.runner.drafter.setup.score_layers == "layer"
    assert r.scores is not None and r.scores.shape == (L, len(r.blocks)) and (r.scores[:, 0] > 0).all()
    first = (r.computed - 64 + 1) // 64
    # scores of our own: layer l prefers blocks l + 1 and l + 3 (distinct per layer)
    fake = torch.zeros(L, len(r.blocks))
    for layer in range(L):
        fake[layer, layer + 1] = fake[layer, layer + 3] = 1.0
    r.scores = fake
    view = draft_view(core, r, 2)
    assert view.read is not None and view.read_pos is not None and view.per_layer
    assert view.read.shape[0] == L and view.read_pos.shape[:2] == (L, 1)
    window = list(range(first, (r.computed + 1) // 64 + 1))
    for layer in range(L):
        want = [0, layer + 1, layer + 3] + window
        used = view.read_pos[layer, 0, ::64] >= 0  # the window's spare column reads the trash block
        assert view.read[layer, 0][used].tolist() == [r.blocks[c] for c in want]
        assert (view.read[layer, 0][~used] == core.cache.trash).all()
        assert view.read_pos[layer, 0, ::64][used].tolist() == [c * 64 for c in want]
    assert view.sinks == 3 * 64 and view.window == 64
    e.close()


def test_guided_window_checks(tiny_llm: LLM) -> None:
    with pytest.raises(ValueError, match="guided_window"):
        DraftTuning(guided_window=0)
    with pytest.raises(ValueError, match="guided_scores"):
        DraftTuning(guided_scores="mean")
    with pytest.raises(ValueError, match="guided_window"):  # no room left in the budget
        SpecConfig(method="self", drafter="guided", budget=256, tuning=DraftTuning(guided_window=256))
    spec = SpecConfig(method="self", drafter="guided", budget=512, tuning=DraftTuning(guided_window=256))
    assert spec.recent_window == 256 and spec.n_kept == 256
    assert SpecConfig(method="self", drafter="guided", budget=512).recent_window == 64  # today's default
    # 256 - 150 = 106 tokens: the sink block only, no selected block
    with pytest.raises(ValueError, match="selected block"):
        Engine(llm=tiny_llm, spec=SpecConfig(method="self", drafter="guided", budget=256,
                                             tuning=DraftTuning(guided_window=150)), quiet=True)
