"""Speculative sampling on the engine draws from the target's distribution, with every drafter: chi-square tests
of the generated tokens against the exact distribution, computed from the target's own logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from conftest import full_logits, random_prompts, tiny_config, write_checkpoint
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.runtime.sampling import probabilities
from magicdec.spec.config import DraftTuning

VOCAB, N, PROMPT_LEN = 32, 6000, 40


@pytest.fixture
def one_thread(threads: None) -> None:
    """Thousands of tiny forwards: one thread each (no waiting on a second thread of a busy machine)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[LLM, Path]:
    target = write_checkpoint(tmp_path_factory.mktemp("t"), tiny_config(vocab_size=VOCAB), seed=5)
    draft = write_checkpoint(tmp_path_factory.mktemp("d"), tiny_config(vocab_size=VOCAB, n_layers=1), seed=6)
    return LLM(target, device="cpu"), draft


@pytest.fixture(scope="module")
def drafts(models: tuple[LLM, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Draft models by name: a smaller model; the same vocabulary cut short (the target's is padded
    beyond it); the target itself (every draft accepted, so every round ends with a bonus token)."""
    llm, draft = models
    short = write_checkpoint(tmp_path_factory.mktemp("s"), tiny_config(vocab_size=VOCAB - 5, n_layers=1), seed=7)
    return {"small": draft, "short-vocab": short, "target": llm.loaded.path}


def next_token_probs(llm: LLM, seqs: list[list[int]], params: SamplingParams) -> torch.Tensor:
    return probabilities(full_logits(llm.model, seqs)[:, -1], params)


def exact_joint(llm: LLM, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(t1, t2, t3) for the three tokens after `prompt`, [V, V, V]."""
    p1 = next_token_probs(llm, [prompt], params)[0]
    p2 = next_token_probs(llm, [prompt + [a] for a in range(VOCAB)], params)  # [V, V]
    seqs = [prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)]
    p3 = next_token_probs(llm, seqs, params).view(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Goodness of fit; cells expecting fewer than 5 samples are pooled into one."""
    exp = expected_probs.flatten().double() * observed.sum()
    obs = observed.flatten().double()
    small = exp < 5
    obs = torch.cat([obs[~small], obs[small].sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp[keep].sum().item()).pvalue)


def sample_counts(llm: LLM, prompt: list[int], params: SamplingParams, spec: SpecConfig | None) -> torch.Tensor:
    outs = llm.generate([prompt] * N, params, spec).outputs
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    for o in outs:
        a, b, c = o.token_ids
        counts[a, b, c] += 1
    return counts


def engine_chi2(llm: LLM, spec: SpecConfig) -> tuple[dict[str, float], float | None]:
    """N seeded requests of 3 tokens sampled at temperature 1 after one prompt, through an `Engine` with `spec`:
    the χ² p-values against the exact joint distribution, and the acceptance rate."""
    prompt = random_prompts(1, [PROMPT_LEN], VOCAB - 5, seed=3)[0]
    engine = Engine(llm=llm, spec=spec, max_num_seqs=64, max_num_batched_tokens=4096, quiet=True)
    ids = [engine.add_request(prompt, SamplingParams(max_new_tokens=3, seed=s, ignore_eos=True, temperature=1.0))
           for s in range(N)]
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    rate = engine.stats.spec.acceptance_rate
    engine.close()
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    for i in ids:
        a, b, c = outs[i]
        counts[a, b, c] += 1
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, temperature=1.0)
    return check(counts, exact_joint(llm, prompt, params)), rate


def check(counts: torch.Tensor, joint: torch.Tensor) -> dict[str, float]:
    return {
        "t2": chi2_pvalue(counts.sum((0, 2)), joint.sum((0, 2))),
        "t3": chi2_pvalue(counts.sum((0, 1)), joint.sum((0, 1))),
        "t2,t3": chi2_pvalue(counts.sum(0), joint.sum(0)),
        "t1,t2": chi2_pvalue(counts.sum(2), joint.sum(2)),
    }


# name: (speculation, sampling, acceptance range); the draft model's name, if any, is in "draft_model"
SETTINGS = {
    "draft-model": (dict(method="draft", drafter="full", draft_model="small"), dict(temperature=1.0), (0.05, 0.99)),
    "self-streaming": (dict(method="self", drafter="streaming", budget=8, sinks=2), dict(temperature=1.0),
                       (0.05, 0.99)),
    # a self-draft with KV of its own (computed through its own window) in a pool of its own
    "self-streaming-own-kv": (dict(method="self", drafter="streaming", budget=8, sinks=2,
                                   tuning=DraftTuning(kv_source="own")), dict(temperature=1.0), (0.05, 0.99)),
    "self-int8": (dict(method="self", drafter="streaming", budget=8, sinks=2, draft_weights="int8"),
                  dict(temperature=1.0), (0.05, 0.99)),
    "self-int4": (dict(method="self", drafter="streaming", budget=8, sinks=2, draft_weights="int4"),
                  dict(temperature=1.0), (0.05, 0.99)),
    "self-snapkv": (dict(method="self", drafter="snapkv", budget=8, tuning=DraftTuning(snapkv_window=2, observe=4)),
                    dict(temperature=1.0), (0.05, 0.99)),
    # the guided view over int8 weights (block 0 kept whole, a window of 2): rejections happen
    "self-guided-int8": (dict(method="self", drafter="guided", budget=128, draft_weights="int8",
                              tuning=DraftTuning(snapkv_window=2)), dict(temperature=1.0), (0.05, 0.99)),
    # the same with per-layer block scores (each layer of the draft its own read table)
    "self-guided-layer-int8": (dict(method="self", drafter="guided", budget=128, draft_weights="int8",
                                    tuning=DraftTuning(snapkv_window=2, guided_scores="layer")),
                               dict(temperature=1.0), (0.05, 0.99)),
    # model-free proposals (one-hot q): a rejection resamples from p with the proposed token removed
    "ngram": (dict(method="self", drafter="ngram", tuning=DraftTuning(ngram_min=1)), dict(temperature=1.0),
              (0.02, 0.99)),
    "suffix": (dict(method="self", drafter="suffix"), dict(temperature=0.8, top_k=12), (0.02, 0.99)),
    "hybrid": (dict(method="self", drafter="hybrid", budget=8, sinks=2, draft_weights="int8",
                    tuning=DraftTuning(ngram_min=1)), dict(temperature=1.0), (0.02, 0.99)),
    "draft-topk-topp": (dict(method="draft", drafter="full", draft_model="small"),
                        dict(temperature=0.7, top_k=10, top_p=0.9), (0.05, 0.99)),
    "draft-short-vocab": (dict(method="draft", drafter="full", draft_model="short-vocab"), dict(temperature=1.0),
                          (0.05, 0.99)),
    # γ = 1 over 3 tokens: the second token is an accepted draft, the third the round's bonus token
    "bonus-token": (dict(method="draft", drafter="full", draft_model="target", gamma=1), dict(temperature=1.0),
                    (1.0, 1.0)),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_speculative_sampling_matches_the_target_distribution(models: tuple[LLM, Path], drafts: dict[str, Path],
                                                              one_thread: None, name: str) -> None:
    """The engine's speculative sampling (a seeded generator per request, ragged rounds, sampled rows verified
    one by one beside a greedy one) keeps the target's distribution."""
    llm, _ = models
    spec_kw, sample_kw, (low, high) = SETTINGS[name]
    if "draft_model" in spec_kw:
        spec_kw = {**spec_kw, "draft_model": str(drafts[spec_kw["draft_model"]])}
    spec = SpecConfig(**{"gamma": 2, **spec_kw})
    prompt = random_prompts(1, [PROMPT_LEN], VOCAB - 5, seed=3)[0]
    engine = Engine(llm=llm, spec=spec, max_num_seqs=64, max_num_batched_tokens=4096, quiet=True)
    greedy = engine.add_request(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))  # a greedy neighbour
    ids = [engine.add_request(prompt, SamplingParams(max_new_tokens=3, seed=s, ignore_eos=True, **sample_kw))
           for s in range(N)]
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    for i in ids:
        a, b, c = outs[i]
        counts[a, b, c] += 1
    assert len(outs[greedy]) == 3
    rate = engine.stats.spec.acceptance_rate
    engine.close()
    assert rate is not None and low <= rate <= high  # with a different draft, rejections happen
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, **sample_kw)
    pvalues = check(counts, exact_joint(llm, prompt, params))
    assert min(pvalues.values()) > 1e-3, pvalues


def test_the_chi_square_check_detects_a_wrong_distribution(models: tuple[LLM, Path], one_thread: None) -> None:
    """Power check: samples from the draft model fail the same test against the target's distribution."""
    llm, draft = models
    params = SamplingParams(max_new_tokens=3, seed=99, temperature=1.0, ignore_eos=True)
    prompt = random_prompts(1, [PROMPT_LEN], VOCAB, seed=3)[0]
    draft_llm = LLM(draft, device="cpu")
    pvalues = check(sample_counts(draft_llm, prompt, params, None), exact_joint(llm, prompt, params))
    assert max(pvalues.values()) < 1e-6, pvalues
    plain = check(sample_counts(llm, prompt, params, None), exact_joint(llm, prompt, params))
    assert min(plain.values()) > 1e-3, plain
