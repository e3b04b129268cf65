"""End to end on the real SmolLM2 with long real prompts: speculative greedy output is token for
token that of plain decoding, with every self-drafter, at batch 8 with ragged prompt lengths."""

from __future__ import annotations

import pytest

from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig
from magicdec.bench.corpora import load_corpus, make_prompts

pytestmark = pytest.mark.slow
PARAMS = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def austen_prompts(smol: LLM) -> list[list[int]]:
    lengths = [900, 840, 777, 700, 650, 600, 560, 512]
    return make_prompts(smol.tokenizer, load_corpus("austen"), lengths=lengths, seed=2026, region="tail")


@pytest.fixture(scope="module")
def plain(smol: LLM, austen_prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in smol.generate(austen_prompts, PARAMS).outputs]


@pytest.mark.parametrize(
    "spec",
    [
        SpecConfig(method="self", drafter="streaming", budget=256, sinks=16, gamma=3),
        SpecConfig(method="self", drafter="snapkv", budget=256, gamma=3),
        SpecConfig(method="self", drafter="guided", budget=256, gamma=3),
    ],
    ids=["streaming", "snapkv", "guided"],
)
def test_self_speculation_is_exact_on_long_real_prompts(smol: LLM, austen_prompts: list[list[int]],
                                                        plain: list[list[int]], spec: SpecConfig) -> None:
    result = smol.generate(austen_prompts, PARAMS, spec)
    assert [o.token_ids for o in result.outputs] == plain
    assert result.stats.acceptance_rate > 0.5  # a working drafter on real text


def test_own_kv_drafts_are_exact(smol: LLM, austen_prompts: list[list[int]], plain: list[list[int]]) -> None:
    """The draft's KV of its own, in a pool of its own: computed with every prefill chunk and caught up on what it
    has not seen."""
    spec = SpecConfig(method="self", drafter="streaming", budget=128, sinks=4, gamma=2,
                      tuning=DraftTuning(kv_source="own"))  # acceptance 0.60 here (0.67 reading the target's KV)
    result = smol.generate(austen_prompts[:4], PARAMS, spec)
    assert [o.token_ids for o in result.outputs] == plain[:4]
    assert result.stats.acceptance_rate > 0.5
