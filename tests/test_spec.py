"""Speculative decoding on the engine: greedy output identical to plain decoding with every drafter (StreamingLLM,
SnapKV and guided self-drafts over the target's pages, int8/int4 draft weights, a self-draft with KV of its own,
draft models full and streaming), across EOS, plain steps between rounds and ragged γ; the speculation settings'
checks. (The sampling distribution: tests/test_spec_sampling.py.)"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest

from conftest import random_prompts, tiny_config, write_checkpoint
from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig
from magicdec.costmodel.policy import BatchView, GammaPolicy, StepReport
from magicdec.engine.outputs import GenerationResult

DRAFTERS = {
    "self-streaming": dict(method="self", drafter="streaming", budget=24, sinks=4),
    "self-streaming-own-kv": dict(method="self", drafter="streaming", budget=24, sinks=4,
                                  tuning=DraftTuning(kv_source="own")),
    "self-snapkv": dict(method="self", drafter="snapkv", budget=24, tuning=DraftTuning(snapkv_window=8, observe=8)),
    # block 0, one block chosen by the last verification's block scores, a window of 64
    "self-guided": dict(method="self", drafter="guided", budget=192),
    "self-int8": dict(method="self", drafter="streaming", budget=24, sinks=4, draft_weights="int8"),
    "self-int4": dict(method="self", drafter="streaming", budget=24, sinks=4, draft_weights="int4"),
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


class Cycle:
    """A batch-wide γ policy that runs the γ of `pattern` in turn (0: a plain step for every request)."""

    def __init__(self, *pattern: int) -> None:
        self.pattern, self.n = pattern, 0

    def choose(self, batch: BatchView) -> int:
        self.n += 1
        return self.pattern[self.n % len(self.pattern)]

    def observe(self, report: StepReport) -> None:
        pass

    def stats(self) -> dict:
        return {}


def generate_with(llm: LLM, prompts: list[list[int]], params: SamplingParams, spec: SpecConfig,
                  policy: GammaPolicy) -> GenerationResult:
    """`llm.generate` with a batch-wide γ policy of one's own instead of the setting's."""
    ids = llm.encode(prompts)
    core = llm.core_for(ids, params, spec)
    try:
        core.set_speculation(spec, gamma_policy=policy)
        return llm.run(core, ids, params)
    finally:
        core.close()


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_greedy_speculation_equals_plain_decoding(tiny_llm: LLM, draft_dir: Path, name: str) -> None:
    prompts = random_prompts(5, [70, 12, 45, 3, 301], tiny_llm.config.vocab_size, seed=21)
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


def test_requests_ending_at_eos_leave_without_changing_the_others(tiny_llm: LLM, draft_dir: Path) -> None:
    """Requests that run together stop at different steps (EOS, one after 3 tokens, others later, or at their
    length); every drafter gives the others plain decoding's tokens."""
    prompts = random_prompts(6, [40, 9, 66, 25, 13, 50], tiny_llm.config.vocab_size, seed=31)
    free = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=30, ignore_eos=True)).outputs
    eos = free[4].token_ids[3]
    tiny_llm.eos_token_ids = {eos}
    try:
        params = SamplingParams(max_new_tokens=30)
        plain = [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]
        for name in ("self-streaming", "self-snapkv", "self-guided", "draft-streaming", "self-streaming-own-kv"):
            spec = tiny_llm.generate(prompts, params, spec_config(name, draft_dir))
            assert [o.token_ids for o in spec.outputs] == plain, name
    finally:
        tiny_llm.eos_token_ids = {2}
    assert sorted(len(p) for p in plain)[0] <= 4 and max(len(p) for p in plain) == 30


def test_gamma_zero_rounds_fall_back_to_plain_steps(tiny_llm: LLM) -> None:
    prompts = random_prompts(3, [50, 20, 33], tiny_llm.config.vocab_size, seed=12)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain = [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]
    for kv in ("target", "own"):
        spec = SpecConfig(method="self", budget=16, sinks=2, tuning=DraftTuning(kv_source=kv), gamma=3)
        out = generate_with(tiny_llm, prompts, params, spec, Cycle(0, 2, 0, 0, 3))
        assert [o.token_ids for o in out.outputs] == plain, kv
        assert 0 in out.stats.gamma_history


@pytest.mark.parametrize("kv", ["target", "own"])
def test_a_self_draft_holding_everything_accepts_everything_after_plain_steps(tiny_llm: LLM, kv: str) -> None:
    """Self-speculation whose StreamingLLM budget covers every position drafts exactly what the target
    decodes; with KV of its own, provided the plain steps between rounds reached its pool (its catch-up)."""
    prompts = random_prompts(3, [40, 9, 23], tiny_llm.config.vocab_size, seed=21)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = SpecConfig(method="self", budget=128, sinks=2, gamma=3, tuning=DraftTuning(kv_source=kv))
    out = generate_with(tiny_llm, prompts, params, spec, Cycle(0, 0, 3, 0, 2, 0, 0, 0))
    assert out.stats.acceptance_rate == 1.0 and 0 in out.stats.gamma_history
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in tiny_llm.generate(prompts, params).outputs]


def test_compare_reports_speedup_and_identical_outputs(tiny_llm: LLM) -> None:
    from magicdec.bench.compare import compare

    prompts = random_prompts(2, [40, 25], tiny_llm.config.vocab_size, seed=2)
    r = compare(tiny_llm, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True),
                SpecConfig(method="self", budget=16, sinks=2))
    d = r.to_dict()["stats"]
    assert d["matches_plain"] is True and d["speedup"] > 0
    assert len(d["per_sequence"]) == 2 and len(d["per_position_acceptance"]) == 3
    # the same tokens on both sides: the median of each repeat's ratio of decode times (runs adjacent in time)
    assert d["baseline"]["generated_tokens"] == d["generated_tokens"] and d["repeats"] >= 2
    assert d["speedup"] == pytest.approx(statistics.median(b / s for b, s in zip(d["decode_s_baselines"],
                                                                                 d["decode_s_runs"])), rel=1e-9)


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



def test_a_gamma_beyond_what_the_engine_was_set_up_for_is_refused(tiny_llm: LLM) -> None:
    """A custom policy's γ is checked against the engine's bound (the blocks a round may write were reserved
    for it; past them, a write out of bounds on CUDA)."""
    prompts = random_prompts(2, [20, 9], tiny_llm.config.vocab_size, seed=2)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    spec = SpecConfig(method="self", budget=16, sinks=2, gamma=3)
    with pytest.raises(ValueError, match=r"γ = 5 is outside 0 … 3"):
        generate_with(tiny_llm, prompts, params, spec, Cycle(5))


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
