"""Plain batched generation: greedy equals transformers, sampling controls, stop rules, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import hf_greedy, hf_model, random_prompts, until_eos
from magicdec import LLM, PromptError, SamplingParams, SpecConfig
from magicdec.cache.memory import OutOfMemoryPlan
from magicdec.runtime.sampling import probabilities

UNSEEN = [  # text written for these tests, so no model has seen it
    "The lighthouse keeper counted the gulls twice each morning, because the first count was never",
    "Rain fell on the copper roofs of the market town while the clockmaker's apprentice",
    "Question: what do seven orange kites and a broken ladder have in common? Answer:",
]


@pytest.mark.slow
def test_greedy_generation_equals_transformers_on_smollm2(smol: LLM, hf_smol) -> None:
    params = SamplingParams(max_new_tokens=24)
    result = smol.generate(UNSEEN, params)
    for out in result.outputs:
        assert out.token_ids == until_eos(hf_greedy(hf_smol, out.prompt_token_ids, 24), smol.eos_token_ids)


@pytest.mark.slow
def test_cli_json_greedy_equals_transformers(smol: LLM, hf_smol) -> None:
    cmd = [sys.executable, "-m", "magicdec", "generate", "--json", "--temperature", "0", "--max-new-tokens", "16",
           "--prompt", UNSEEN[0], "--prompt", UNSEEN[2]]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout)
    assert set(data["stats"]) >= {"prefill_s", "decode_s", "tokens_per_s"}
    for out in data["outputs"]:
        assert out["token_ids"] == until_eos(hf_greedy(hf_smol, out["prompt_token_ids"], 16), smol.eos_token_ids)
        assert out["text"] == smol.tokenizer.decode(out["token_ids"])


def test_tiny_greedy_equals_transformers(tiny_llm: LLM, tiny_dir) -> None:
    hf = hf_model(tiny_dir)
    prompts = random_prompts(3, [17, 40, 9], tiny_llm.config.vocab_size, seed=4)
    result = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    for p, out in zip(prompts, result.outputs):
        assert out.token_ids == hf_greedy(hf, p, 20)


def test_each_sequence_stops_at_eos_while_others_go_on(tiny_llm: LLM) -> None:
    prompts = random_prompts(4, [12, 30, 21, 8], tiny_llm.config.vocab_size, seed=11)
    free = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True)).outputs
    eos = free[1].token_ids[5]  # make the 6th token of sequence 1 the EOS
    tiny_llm.eos_token_ids = {eos}
    try:
        outs = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=16)).outputs
    finally:
        tiny_llm.eos_token_ids = {2}
    for f, o in zip(free, outs):
        cut = f.token_ids.index(eos) + 1 if eos in f.token_ids else 16
        assert o.token_ids == f.token_ids[:cut]
        assert o.finish_reason == ("stop" if cut < 16 or f.token_ids[-1] == eos else "length")
    assert len(outs[1].token_ids) <= 6


def test_stop_string_truncates_text_and_tokens(smol: LLM) -> None:
    base = smol.generate([UNSEEN[1]], SamplingParams(max_new_tokens=30)).outputs[0]
    words = base.text.split()
    stop = words[4]
    out = smol.generate([UNSEEN[1]], SamplingParams(max_new_tokens=30, stop=(stop,))).outputs[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and base.text.startswith(out.text)
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    assert stop in smol.tokenizer.decode(out.token_ids)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny_llm: LLM) -> None:
    prompts = random_prompts(2, [10], tiny_llm.config.vocab_size)
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = tiny_llm.generate(prompts, p).outputs
    b = tiny_llm.generate(prompts, p).outputs
    c = tiny_llm.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8, ignore_eos=True)).outputs
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5+0.2 < 0.8 ≤ +0.15
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    p = probabilities(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(p, torch.softmax(logits * 2, -1))
    assert probabilities(logits, SamplingParams()).tolist() == [[1.0, 0, 0, 0, 0]]


def test_prompt_longer_than_context_is_refused(tiny_llm: LLM) -> None:
    long = random_prompts(1, [4090], tiny_llm.config.vocab_size)
    with pytest.raises(PromptError, match="beyond the model's context of 4096"):
        tiny_llm.generate(long, SamplingParams(max_new_tokens=10))
    with pytest.raises(PromptError, match="empty"):
        tiny_llm.generate([[]])


def test_cache_that_does_not_fit_is_refused_before_allocating(tiny_llm: LLM) -> None:
    tiny_llm.memory_budget = 1 << 20
    try:
        with pytest.raises(OutOfMemoryPlan, match=r"needs .*target KV cache [0-9.]+ [KM]iB.*budget of 1\.0 MiB"):
            tiny_llm.generate(random_prompts(64, [1000], tiny_llm.config.vocab_size), SamplingParams(max_new_tokens=8))
    finally:
        tiny_llm.memory_budget = None


def test_the_memory_plan_counts_weights_transients_and_the_draft_pool_against_the_budget(tiny_llm: LLM) -> None:
    """The budget covers everything: weights, the target's KV pool, the prefill's transient masks and expanded
    keys, and the pool of a draft with KV of its own. A refusal names them all and what to lower."""
    from magicdec.cache.memory import prefill_transient_bytes
    from magicdec.cache.paged import PagedKVCache
    from magicdec.spec.config import DraftTuning

    prompts = random_prompts(4, [300] * 4, tiny_llm.config.vocab_size, seed=1)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    own = SpecConfig(method="self", budget=300, sinks=4, gamma=3, tuning=DraftTuning(kv_source="own"))
    weights = tiny_llm.models.memory_plan().total
    one = -(-(300 + 8 + 3 + 1) // 64)  # the blocks of one request and a round's lookahead
    block = PagedKVCache.bytes_per_block(tiny_llm.model, 64)  # the target's, and the own-KV draft's
    transient = prefill_transient_bytes(tiny_llm.model, 1, 32, 308)  # prefill chunks of 32 tokens
    try:
        tiny_llm.prefill_chunk = 32
        tiny_llm.memory_budget = one * block + transient + 1024  # enough for the pool, not for the weights too
        with pytest.raises(OutOfMemoryPlan, match=r"weights .*target KV cache .*prefill masks and expanded KV"):
            tiny_llm.generate(prompts, params, SpecConfig(method="self", budget=300, sinks=4, gamma=3))
        tiny_llm.memory_budget = weights + transient + 2 * one * block - 1024  # the target's pool fits, the draft's not
        with pytest.raises(OutOfMemoryPlan, match=r"target KV cache .*draft KV cache .*budget"):
            tiny_llm.generate(prompts, params, own)
        plain = tiny_llm.generate(prompts, params)  # without a pool of its own, the draft fits
        spec = tiny_llm.generate(prompts, params, SpecConfig(method="self", budget=300, sinks=4, gamma=3))
        assert [o.token_ids for o in spec.outputs] == [o.token_ids for o in plain.outputs]
    finally:
        tiny_llm.memory_budget, tiny_llm.prefill_chunk = None, 512


def test_bad_sampling_parameters_are_refused() -> None:
    for kwargs in ({"temperature": -1}, {"temperature": float("nan")}, {"top_p": 0}, {"top_p": float("nan")},
                   {"top_k": -2}, {"max_new_tokens": 0}, {"seed": 1 << 64}, {"seed": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_nan_logits_end_the_requests_with_a_clear_error(tiny_dir) -> None:
    """Greedy decoding of NaN logits would emit token 0 forever: prefill, plain steps and verification
    all refuse them instead (the request ends with finish_reason "error"; `generate` raises its error)."""
    llm = LLM(tiny_dir, device="cpu")
    prompts = random_prompts(2, [12, 7], llm.config.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    spec = SpecConfig(method="self", budget=8, sinks=2, gamma=2)
    head = llm.model.lm_head.weight
    good = head[5, 0].item()

    def poison(value: float) -> None:
        with torch.no_grad():
            head[5, 0] = value  # NaN: token 5's logit is NaN from now on

    for s in (None, spec):
        poison(float("nan"))
        try:
            with pytest.raises(RuntimeError, match="prompt 0 failed: NumericalError: the model produced NaN logits "
                                                   "in the prefill"):
                llm.generate(prompts, params, s)
        finally:
            poison(good)
        ids = llm.encode(prompts)
        core = llm.core_for(ids, params, s)
        rids = [core.add_request(p, params) for p in ids]
        while not all(core.requests[r].output for r in rids):  # prefilled, first tokens out
            core.step()
        poison(float("nan"))
        try:
            final = {}
            while core.has_unfinished_requests():
                final.update((o.request_id, o) for o in core.step() if o.finished)
        finally:
            poison(good)
        for r in rids:
            assert final[r].finish_reason == "error" and "NaN logits in verification" in (final[r].error or "")
        assert core.stats.errors == 2
        core.pool.check_empty()
        core.close()
