"""End to end on the real SmolLM2 with long real prompts: speculative greedy output is token for
token that of plain decoding, with every self-drafter, at batch 8 with ragged prompt lengths."""

from __future__ import annotations

import pytest

from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig
from magicdec.bench.compare import compare
from magicdec.data import load_corpus, make_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def austen_prompts(smol: LLM) -> list[list[int]]:
    lengths = [900, 840, 777, 700, 650, 600, 560, 512]
    return make_prompts(smol.tokenizer, load_corpus("austen"), lengths=lengths, seed=2026, region="tail")


@pytest.mark.parametrize(
    "spec",
    [
        SpecConfig(method="self", drafter="streaming", budget=256, sinks=16, gamma=3),
        SpecConfig(method="self", drafter="snapkv", budget=256, gamma=3),
    ],
    ids=["streaming", "snapkv"],
)
def test_self_speculation_is_exact_on_long_real_prompts(smol: LLM, austen_prompts, spec: SpecConfig) -> None:
    c = compare(smol, austen_prompts, SamplingParams(max_new_tokens=24), spec)
    assert c.matches_plain
    assert c.result.stats.acceptance_rate > 0.5  # a working drafter on real text


def test_own_kv_drafts_are_exact(smol: LLM, austen_prompts) -> None:
    """The draft's own windowed prefill and KV (shorter prompts: this mode prefills twice)."""
    prompts = [p[:400] for p in austen_prompts[:4]]
    spec = SpecConfig(method="self", drafter="streaming", budget=128, sinks=4, gamma=4,
                      tuning=DraftTuning(kv_source="own"))
    c = compare(smol, prompts, SamplingParams(max_new_tokens=24), spec)
    assert c.matches_plain
    assert c.result.stats.acceptance_rate > 0.5
