"""Speculative decoding: greedy output identical to plain decoding with every drafter, the
sampling distribution equal to plain sampling, and the sparse cache's masking and rollback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import random_prompts, tiny_config, write_checkpoint
from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig
from magicdec.bench.compare import compare
from magicdec.cache.dense import DenseKVCache
from magicdec.cache.sparse import SparseKVCache
from magicdec.model.attention import AttentionMask, attend

DRAFTERS = {
    "self-streaming": dict(method="self", drafter="streaming", budget=24, sinks=4),
    "self-streaming-own-kv": dict(method="self", drafter="streaming", budget=24, sinks=4,
                                  tuning=DraftTuning(kv_source="own")),
    "self-snapkv": dict(method="self", drafter="snapkv", budget=24, tuning=DraftTuning(snapkv_window=8, observe=8)),
    "draft-full": dict(method="draft", drafter="full"),
    "draft-streaming": dict(method="draft", drafter="streaming", budget=20, sinks=2),
}


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(n_layers=2, hidden_size=32, intermediate_size=64, n_heads=2, n_kv_heads=1)
    return write_checkpoint(tmp_path_factory.mktemp("draft"), cfg, seed=1)


def spec_config(name: str, draft_dir: Path, gamma: int = 3) -> SpecConfig:
    kw = dict(DRAFTERS[name])
    if kw["method"] == "draft":
        kw["draft_model"] = str(draft_dir)
    return SpecConfig(gamma=gamma, **kw)


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_greedy_speculation_equals_plain_decoding(tiny_llm: LLM, draft_dir: Path, name: str) -> None:
    prompts = random_prompts(5, [70, 12, 45, 3, 101], tiny_llm.config.vocab_size, seed=21)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]
    for gamma in (1, 4):
        result = tiny_llm.generate(prompts, params, spec_config(name, draft_dir, gamma))
        assert [o.token_ids for o in result.outputs] == plain, f"{name}, gamma={gamma}"
        s = result.stats
        a = s.acceptance  # (the last rounds draft no further than the tokens still needed)
        assert a.drafted_at[0] == a.rounds and a.draft_tokens <= gamma * a.rounds
        assert 0 <= a.accepted_tokens <= a.draft_tokens
        assert a.rounds == sum(o.spec.rounds for o in result.outputs)


def test_draft_identical_to_target_accepts_everything(tiny_llm: LLM, tiny_dir: Path) -> None:
    """The same weights with a full cache agree with the target on every token: α = 1, and "own"
    mode catches up on the bonus token of every all-accepted round."""
    prompts = random_prompts(3, [30, 8, 17], tiny_llm.config.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=25, ignore_eos=True)
    result = tiny_llm.generate(prompts, params, SpecConfig(method="draft", drafter="full", draft_model=str(tiny_dir),
                                                           gamma=4))
    assert result.stats.acceptance_rate == 1.0
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]


def test_eos_in_the_middle_of_the_batch(tiny_llm: LLM, draft_dir: Path) -> None:
    prompts = random_prompts(4, [40, 9, 66, 25], tiny_llm.config.vocab_size, seed=8)
    free = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=30, ignore_eos=True)).outputs
    eos = free[2].token_ids[7]
    tiny_llm.eos_token_ids = {eos}
    try:
        plain = [o.token_ids for o in tiny_llm.generate(prompts, SamplingParams(max_new_tokens=30)).outputs]
        for name in ("self-streaming", "self-snapkv", "draft-streaming"):
            spec = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=30), spec_config(name, draft_dir))
            assert [o.token_ids for o in spec.outputs] == plain, name
    finally:
        tiny_llm.eos_token_ids = {2}
    assert len(plain[2]) <= 8 and max(len(p) for p in plain) == 30


@pytest.mark.parametrize("lazy", [False, True], ids=["drop-at-once", "finished-rows-as-padding"])
def test_finished_rows_leave_the_batch_without_changing_the_others(tiny_llm: LLM, draft_dir: Path, lazy: bool) -> None:
    """Sequences of one batch stop at different steps (EOS, different lengths); whether finished rows are
    dropped at once or ride along as padding until the batch halves, the others' tokens are unchanged."""
    prompts = random_prompts(6, [40, 9, 66, 25, 13, 50], tiny_llm.config.vocab_size, seed=31)
    free = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=30, ignore_eos=True)).outputs
    eos = free[4].token_ids[3]
    tiny_llm.eos_token_ids, tiny_llm.lazy_compaction = {eos}, lazy
    try:
        params = SamplingParams(max_new_tokens=30)
        plain = [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]
        for name in ("self-streaming", "draft-streaming", "self-streaming-own-kv"):
            spec = tiny_llm.generate(prompts, params, spec_config(name, draft_dir))
            assert [o.token_ids for o in spec.outputs] == plain, name
    finally:
        tiny_llm.eos_token_ids, tiny_llm.lazy_compaction = {2}, None
    assert sorted(len(p) for p in plain)[0] <= 4 and max(len(p) for p in plain) == 30


def test_gamma_zero_rounds_fall_back_to_plain_steps(tiny_llm: LLM) -> None:
    class Alternate:
        def __init__(self) -> None:
            self.n = 0

        def choose(self, batch) -> int:
            self.n += 1
            return (0, 2, 0, 0, 3)[self.n % 5]

        def observe(self, report) -> None:
            pass

        def stats(self) -> dict:
            return {}

    prompts = random_prompts(3, [50, 20, 33], tiny_llm.config.vocab_size, seed=12)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain = [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]
    for kv in ("target", "own"):
        spec = SpecConfig(method="self", budget=16, sinks=2, tuning=DraftTuning(kv_source=kv), gamma=3)
        out = tiny_llm.generate(prompts, params, spec, gamma_policy=Alternate())
        assert [o.token_ids for o in out.outputs] == plain, kv
        assert 0 in out.stats.gamma_history


def test_a_self_draft_holding_everything_accepts_everything_after_plain_steps(tiny_llm: LLM) -> None:
    """Self-speculation whose StreamingLLM budget covers every position drafts exactly what the target
    decodes, provided the plain steps between rounds reached the draft cache (`Drafter.catch_up`)."""
    class Mixed:
        def __init__(self) -> None:
            self.n = 0

        def choose(self, batch) -> int:
            self.n += 1
            return (0, 0, 3, 0, 2, 0, 0, 0)[self.n % 8]

        def observe(self, report) -> None:
            pass

        def stats(self) -> dict:
            return {}

    prompts = random_prompts(3, [40, 9, 23], tiny_llm.config.vocab_size, seed=21)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = SpecConfig(method="self", budget=128, sinks=2, gamma=3)
    out = tiny_llm.generate(prompts, params, spec, gamma_policy=Mixed())
    assert out.stats.acceptance_rate == 1.0 and 0 in out.stats.gamma_history
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]


def test_compare_reports_speedup_and_identical_outputs(tiny_llm: LLM) -> None:
    prompts = random_prompts(2, [40, 25], tiny_llm.config.vocab_size, seed=2)
    r = compare(tiny_llm, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True),
                SpecConfig(method="self", budget=16, sinks=2))
    d = r.to_dict()["stats"]
    assert d["matches_plain"] is True and d["speedup"] > 0
    assert len(d["per_sequence"]) == 2 and len(d["per_position_acceptance"]) == 3
    assert abs(d["baseline"]["decode_s"] / d["baseline"]["generated_tokens"] / (d["decode_s"] / d["generated_tokens"])
               - d["speedup"]) < 1e-9


# ---- the sparse cache against a masked full-attention reference ------------------------------------
def reference_attention(q, keys, values, qpos, kpos, sinks, window):
    """Plain softmax attention over tokens at positions kpos, allowed iff kpos ≤ qpos and
    (kpos < sinks or kpos > qpos - window)."""
    allowed = (kpos[None, :] <= qpos[:, None]) & ((kpos[None, :] < sinks) | (kpos[None, :] > qpos[:, None] - window))
    mask = AttentionMask(q.shape[1] // keys.shape[1], q.dtype, qpos[None], len(kpos), allowed=allowed[None])
    return attend(q, keys, values, mask)


@pytest.mark.parametrize("chunk", [1, 3, 40])
def test_sliding_window_cache_equals_masked_full_attention(chunk: int) -> None:
    torch.manual_seed(0)
    H, Hkv, D, n, sinks, window = 4, 2, 16, 120, 3, 10
    q, k, v = torch.randn(1, H, n, D), torch.randn(1, Hkv, n, D), torch.randn(1, Hkv, n, D)
    cache = SparseKVCache(1, 1, Hkv, D, n_kept=sinks, window=window, slack=5, group=H // Hkv,
                          dtype=torch.float32, device="cpu")
    outs = []
    for start in range(0, n, chunk):
        pos = torch.arange(start, min(start + chunk, n))[None]
        step = cache.begin(pos)
        outs.append(step.attend(0, q[:, :, pos[0]], k[:, :, pos[0]], v[:, :, pos[0]]))
    ref = reference_attention(q, k, v, torch.arange(n), torch.arange(n), sinks, window)
    assert (torch.cat(outs, dim=2) - ref).abs().max() <= 1e-5


def test_sparse_cache_rolls_back_rejected_tokens() -> None:
    """Write γ drafted positions, keep only some, write different tokens at the rejected positions:
    attention equals a cache that never saw the rejected ones."""
    torch.manual_seed(1)
    H, D, window, slack = 2, 8, 6, 4
    seq = torch.randn(1, H, 40, D)
    junk = torch.randn(1, H, 40, D)
    a = SparseKVCache(1, 1, H, D, 2, window, slack, 1, torch.float32, "cpu")
    b = SparseKVCache(1, 1, H, D, 2, window, slack, 1, torch.float32, "cpu")
    for p in range(30):
        for c, src in ((a, seq), (b, seq)):
            c.begin(torch.tensor([[p]])).attend(0, src[:, :, p : p + 1], src[:, :, p : p + 1], src[:, :, p : p + 1])
    for p in range(30, 33):  # a drafts 3 tokens that are then rejected
        a.begin(torch.tensor([[p]])).attend(0, junk[:, :, p : p + 1], junk[:, :, p : p + 1], junk[:, :, p : p + 1])
    for p in range(30, 38):
        x = seq[:, :, p : p + 1]
        oa = a.begin(torch.tensor([[p]])).attend(0, x, x, x)
        ob = b.begin(torch.tensor([[p]])).attend(0, x, x, x)
        assert torch.allclose(oa, ob, atol=1e-6), p


def test_dense_cache_rollback_is_overwrite() -> None:
    torch.manual_seed(2)
    H, D = 2, 8
    seq, junk = torch.randn(1, H, 20, D), torch.randn(1, H, 20, D)
    a = DenseKVCache(1, 1, H, D, 32, 1, torch.float32, "cpu")
    b = DenseKVCache(1, 1, H, D, 32, 1, torch.float32, "cpu")
    pos = torch.arange(12)[None]
    for c in (a, b):
        c.begin(pos).attend(0, seq[:, :, :12], seq[:, :, :12], seq[:, :, :12])
    a.begin(torch.arange(12, 16)[None]).attend(0, *(junk[:, :, 12:16],) * 3)  # verify block, all rejected
    x = seq[:, :, 12:14]
    p = torch.arange(12, 14)[None]
    assert torch.allclose(a.begin(p).attend(0, x, x, x), b.begin(p).attend(0, x, x, x), atol=1e-6)


@pytest.mark.parametrize("steps", [3, 40])  # fewer, and more, plain steps than the draft's window
def test_catch_up_after_plain_steps_equals_a_fresh_draft_prefill(steps: int) -> None:
    """gamma=auto's plain steps copy nothing into a self-draft's cache; `catch_up` before the next draft
    must leave exactly what a StreamingLLM prefill at the new lengths holds: the sinks and the last
    window of every live row (a finished row keeps what it had)."""
    from magicdec.loading.random_init import random_model
    from magicdec.spec.drafter import Drafter

    cfg = tiny_config()
    model = random_model(cfg, "cpu", torch.float32)
    B, window = 3, 16
    target = DenseKVCache.for_model(model, B, 120)
    torch.manual_seed(5)
    target.k.normal_()
    target.v.normal_()
    tokens = torch.zeros((B, 122), dtype=torch.long)

    def drafter(lens: list[int]) -> Drafter:
        cache = SparseKVCache(cfg.n_layers, B, model.kv_heads, cfg.head_dim, 4, window, 4, cfg.group_size,
                              torch.float32, "cpu")
        d = Drafter(model, cache, "target")
        d.prefill(model, target, tokens, lens, 64)
        return d

    start = [50, 20, 33]
    active = torch.tensor([True, True, False])
    lengths = torch.tensor(start)
    d = drafter(start)
    for _ in range(steps):
        d.commit(lengths, torch.zeros_like(lengths), 0, target, active)  # a plain step: nothing copied yet
        lengths = lengths + active.long()
    d.catch_up(target, lengths, active)
    fresh = drafter(lengths.tolist())
    for row in range(B):
        if not active[row]:
            assert int(d.seen[row]) == start[row]
            continue
        n = int(lengths[row])
        for c in (d.cache, fresh.cache):
            tags = c.tags[row, : c.n_slots]
            assert sorted(t for t in tags.tolist() if t >= n - window or 0 <= t < 4) == \
                [*range(4), *range(n - window, n)]
        slots = d.cache.slot_of(torch.tensor([*range(4), *range(n - window, n)]))
        assert torch.equal(d.cache.k[:, row, :, slots], fresh.cache.k[:, row, :, slots])
        assert torch.equal(d.cache.v[:, row, :, slots], fresh.cache.v[:, row, :, slots])
    assert torch.equal(d.seen[:2], lengths[:2])


def test_a_draft_whose_vocabulary_is_a_prefix_of_the_targets_is_exact(tiny_llm: LLM, tmp_path: Path) -> None:
    """A target padded beyond its tokenizer (Qwen2.5-7B's 152064 ids against Qwen2.5-0.5B's 151936): the
    draft proposes only ids it knows and its distribution has no mass on the others."""
    cfg = tiny_config(vocab_size=tiny_llm.config.vocab_size - 64, n_layers=1)
    draft = write_checkpoint(tmp_path / "short", cfg, seed=4)
    prompts = random_prompts(3, [30, 9, 21], cfg.vocab_size, seed=8)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    spec = SpecConfig(method="draft", drafter="full", draft_model=str(draft), gamma=3)
    plain = [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]
    assert [o.token_ids for o in tiny_llm.generate(prompts, params, spec).outputs] == plain
    sampled = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=24, temperature=1.0, seed=1, ignore_eos=True),
                                spec)
    assert all(len(o.token_ids) == 24 for o in sampled.outputs)


def test_a_draft_with_another_tokenizer_or_a_larger_vocabulary_is_refused(tiny_llm: LLM, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from magicdec import LoadError

    V = tiny_llm.config.vocab_size
    other = write_checkpoint(tmp_path / "other", tiny_config(n_layers=1), seed=4)
    tok = Tokenizer(models.WordLevel({f"w{V - 1 - i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(other / "tokenizer.json"))  # same size, every id means another word
    big = write_checkpoint(tmp_path / "big", tiny_config(vocab_size=V + 8, n_layers=1), seed=4)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for path, words in ((other, "does not share the target's tokenizer"), (big, "more than the target's")):
        with pytest.raises(LoadError, match=words):
            tiny_llm.generate([[5, 6, 7]], params, SpecConfig(method="draft", drafter="full", draft_model=str(path)))



def test_a_block_wider_than_the_slack_does_not_see_stale_rejected_drafts() -> None:
    """An "own"-KV draft catching up on many plain steps feeds them as one block wider than the ring's
    slack; the KV its rejected drafts left at those positions must not be seen beside the block's own."""
    torch.manual_seed(0)
    H, D, sinks, window, slack = 2, 8, 2, 8, 3
    seq, junk = torch.randn(1, H, 30, D), torch.randn(1, H, 30, D)

    def cache_at_20(rejected: bool) -> SparseKVCache:
        c = SparseKVCache(1, 1, H, D, sinks, window, slack, 1, torch.float32, "cpu")
        for p in range(20):
            c.begin(torch.tensor([[p]])).attend(0, *(seq[:, :, p : p + 1],) * 3)
        if rejected:  # three drafts at 20..22, all rejected by verification
            c.begin(torch.arange(20, 23)[None]).attend(0, *(junk[:, :, 20:23],) * 3)
        return c

    block = seq[:, :, 20:25]  # five committed tokens fed at once: wider than the slack
    ours = cache_at_20(True).begin(torch.arange(20, 25)[None]).attend(0, block, block, block)
    clean = cache_at_20(False).begin(torch.arange(20, 25)[None]).attend(0, block, block, block)
    assert torch.allclose(ours, clean, atol=1e-6)

def test_after_rounds_the_draft_cache_equals_a_fresh_build_of_the_same_positions(tiny_llm: LLM) -> None:
    """Exactness of the output cannot see a draft cache that drifted: after speculative and plain rounds,
    every live row's visible draft KV is what a fresh StreamingLLM build at its current length holds."""
    from magicdec.engine.step import Decoding
    from magicdec.spec.factory import plan_drafter

    prompts = random_prompts(3, [50, 20, 33], tiny_llm.config.vocab_size, seed=4)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    spec = SpecConfig(method="self", budget=20, sinks=4, gamma=3)
    batch = tiny_llm.prefill(prompts, params, max_gamma=3)
    setup = plan_drafter(spec, tiny_llm.model, tiny_llm.runner, 3, batch.cache.capacity)
    drafter = setup.build()
    drafter.prefill(tiny_llm.model, batch.cache, batch.state.tokens, batch.prompt_lens, 64)
    decoding = Decoding(tiny_llm.runner, batch, drafter)
    for gamma in (3, 0, 0, 2, 3, 0, 1):
        decoding.step(gamma)
    drafter.catch_up(batch.cache, batch.state.lengths, batch.state.active)
    fresh = setup.build()
    lengths = batch.state.lengths.tolist()
    fresh.prefill(tiny_llm.model, batch.cache, batch.state.tokens, lengths, 64)
    window = drafter.cache.window
    def visible(cache, row: int, n: int) -> dict[int, torch.Tensor]:
        tags = cache.tags[row, : cache.n_slots].tolist()
        return {t: cache.k[:, row, :, s] for s, t in enumerate(tags) if t >= 0 and (t < 4 or t > n - window)}

    for row, n in enumerate(lengths):
        ours, theirs = visible(drafter.cache, row, n), visible(fresh.cache, row, n)
        assert sorted(ours) == sorted(theirs) == [*range(4), *range(n - window + 1, n)]
        assert all(torch.equal(ours[t], theirs[t]) for t in ours)


def test_a_gamma_beyond_what_the_caches_were_allocated_for_is_refused(tiny_llm: LLM) -> None:
    """A custom policy's γ is checked against the draft ring's slack (an out-of-bounds write on CUDA)."""
    class TooFar:
        def choose(self, batch) -> int:
            return 5

        def observe(self, report) -> None:
            pass

        def stats(self) -> dict:
            return {}

    prompts = random_prompts(2, [20, 9], tiny_llm.config.vocab_size, seed=2)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    spec = SpecConfig(method="self", budget=16, sinks=2, gamma=3)
    with pytest.raises(ValueError, match=r"γ = 5 is outside 0 … 3"):
        tiny_llm.generate(prompts, params, spec, gamma_policy=TooFar())
    batch = tiny_llm.prefill(prompts, params, max_gamma=8)  # a batch with room: the draft ring is the limit
    with pytest.raises(ValueError, match=r"γ = 5 is outside 0 … 3"):
        tiny_llm.decode(batch, spec, gamma_policy=TooFar())


def test_speculation_settings_are_validated_with_the_flag_named() -> None:
    from magicdec import Auto

    for make, words in (
        (lambda: SpecConfig(method="self", sinks=-1), "attention sinks (--sinks) must be ≥ 0"),
        (lambda: SpecConfig(method="self", budget=0), "draft KV budget (--budget) must be ≥ 1"),
        (lambda: SpecConfig(method="self", budget=8, sinks=8), "must leave room for a recent window"),
        (lambda: SpecConfig(draft_model="d"), "drop --draft-model"),
        (lambda: DraftTuning(pool_kernel=4), "pool_kernel must be odd"),
        (lambda: DraftTuning(observe=0), "observe"),
        (lambda: Auto(max_gamma=0), "max_gamma"),
        (lambda: SpecConfig(method="self", gamma=0), "gamma must be a positive integer or 'auto'"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            make()
    assert SpecConfig(method="self", gamma="auto").gamma == Auto() and SpecConfig(gamma=4).gamma_bound == 4


def test_a_fixed_gamma_never_drafts_past_the_tokens_still_needed(tiny_llm: LLM) -> None:
    prompts = random_prompts(2, [20, 9], tiny_llm.config.vocab_size, seed=6)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    spec = SpecConfig(method="self", budget=16, sinks=2, gamma=9)  # more drafts than tokens to generate
    out = tiny_llm.generate(prompts, params, spec)
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]
    assert out.stats.gamma_history and max(out.stats.gamma_history) <= 2  # 3 tokens after prefill's first


def test_a_decoded_batch_cannot_be_decoded_again_but_its_forks_can(tiny_llm: LLM) -> None:
    prompts = random_prompts(2, [20, 9], tiny_llm.config.vocab_size, seed=6)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    batch = tiny_llm.prefill(prompts, params, max_gamma=2)
    spec = SpecConfig(method="self", budget=16, sinks=2, gamma=2)
    first, second = tiny_llm.decode(batch.fork(), spec), tiny_llm.decode(batch.fork())
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    tiny_llm.decode(batch)
    with pytest.raises(ValueError, match="decoded already"):
        tiny_llm.decode(batch, spec)
