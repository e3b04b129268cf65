"""`--compare`'s method (bench/compare.py): plain and speculative runs under the same conditions — the same
warm prefix cache, the same admission pattern, the same prefill work — alternating, with identical greedy
outputs. (Its speed ratio with speculation off on both sides is measured by benchmarks/compare_null.py, not
asserted here: speed is for benchmark scripts.)"""

from __future__ import annotations

from conftest import random_prompts
from magicdec import LLM, SamplingParams, SpecConfig
from magicdec.bench.compare import compare


def test_both_sides_run_from_the_same_warm_cache(tiny_llm: LLM) -> None:
    prompts = random_prompts(4, [300, 500, 420, 610], tiny_llm.config.vocab_size, seed=12)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    c = compare(tiny_llm, prompts, params, SpecConfig(method="self", budget=96, sinks=4, gamma=3), repeats=2)
    assert len(c.runs) == len(c.baselines) == 2 and c.matches_plain
    for run in c.runs + c.baselines:  # every run served from the warm-up's cache: only the last partial chunk
        cached = run.stats.extra["prefix_cached_tokens"]
        assert cached == sum(len(p) // 512 * 512 for p in prompts) == c.baselines[0].stats.extra[
            "prefix_cached_tokens"]
    assert c.result.stats.acceptance.draft_tokens > 0 and c.speedup > 0
    assert c.to_dict()["stats"]["matches_plain"] is True


def test_plain_against_plain(tiny_llm: LLM) -> None:
    """The method's own bias is measurable: with speculation off on both sides both are plain runs."""
    prompts = random_prompts(2, [200, 300], tiny_llm.config.vocab_size, seed=13)
    c = compare(tiny_llm, prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), None, repeats=1)
    assert c.matches_plain and c.result.stats.method == "none" and c.baseline.stats.method == "none"
