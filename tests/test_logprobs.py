"""Log-probabilities come from the target's logits at each committed position: under speculation from the
verification forward (never the draft), so they equal plain decoding's; the prompt's come from every
position of its prefill (the request skips the prefix cache)."""

from __future__ import annotations

import pytest
import torch

from conftest import full_logits, random_prompts, tiny_config, write_checkpoint
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.spec.config import DraftTuning

SPECS = {
    "draft-model": dict(method="draft", drafter="full", gamma=3),
    "self-streaming": dict(method="self", drafter="streaming", budget=32, sinks=4, gamma=3),
    "ngram": dict(method="self", drafter="ngram", gamma=4, tuning=DraftTuning(ngram_min=1)),
}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return LLM(write_checkpoint(tmp_path_factory.mktemp("t"), tiny_config(), seed=1), device="cpu")


def flat(outs: list) -> list[tuple[int, float, tuple]]:
    return [(lp.token_id, lp.logprob, lp.top) for o in outs for lp in o.logprobs]


def test_logprobs_equal_plain_decoding_under_speculation(target: LLM) -> None:
    llm = target
    prompts = random_prompts(3, [40, 70], 380, seed=4)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=3, presence_penalty=0.5)
    plain = llm.generate(prompts, params).outputs
    for o in plain:
        assert len(o.logprobs) == len(o.token_ids) and [lp.token_id for lp in o.logprobs] == o.token_ids
        assert all(len(lp.top) == 3 and lp.top[0][1] >= lp.top[2][1] for lp in o.logprobs)
    # the first output's log-probabilities are the model's own, unpenalised
    seq = prompts[0] + plain[0].token_ids
    exact = torch.log_softmax(full_logits(llm.model, [seq])[0, len(prompts[0]) - 1 : -1].float(), -1)
    got = torch.tensor([lp.logprob for lp in plain[0].logprobs])
    torch.testing.assert_close(got, exact.gather(1, torch.tensor(plain[0].token_ids)[:, None])[:, 0],
                               rtol=0, atol=1e-4)
    for name, kw in SPECS.items():
        # (the target as its own draft model: every draft accepted, every round ends with a bonus token)
        spec = SpecConfig(**{**kw, **({"draft_model": str(llm.loaded.path)} if kw["method"] == "draft" else {})})
        out = llm.generate(prompts, params, spec)
        assert out.stats.acceptance.accepted_tokens > 0, name
        a, b = flat(plain), flat(out.outputs)
        assert [x[0] for x in a] == [x[0] for x in b], name
        assert max(abs(x[1] - y[1]) for x, y in zip(a, b)) <= 1e-5, name
        assert [[t for t, _ in x[2]] for x in a] == [[t for t, _ in x[2]] for x in b], name
        assert max(abs(u - v) for x, y in zip(a, b) for (_, u), (_, v) in zip(x[2], y[2])) <= 1e-5, name


def test_prompt_logprobs_skip_the_prefix_cache(target: LLM) -> None:
    """Every prompt token but the first gets its log-probability (the prompt spans several prefill chunks),
    also when the same prompt was just cached."""
    llm = target
    prompt = random_prompts(1, [150], 380, seed=6)[0]
    engine = Engine(llm=llm, prefill_chunk=64, quiet=True)
    outs = []
    for params in (SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=2, prompt_logprobs=1),
                   SamplingParams(max_new_tokens=2)):
        rid = engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.request_id == rid and o.finished]
    _, scored, cached = outs
    assert cached.prompt_logprobs is None and cached.metrics.cached_tokens > 0
    lps = scored.prompt_logprobs
    assert scored.metrics.cached_tokens == 0 and lps is not None and lps[0] is None and len(lps) == len(prompt)
    exact = torch.log_softmax(full_logits(llm.model, [prompt])[0, :-1].float(), -1)
    want = exact.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in lps[1:]]), want, rtol=0, atol=1e-4)
    assert all(len(lp.top) == 1 and lp.top[0][0] == int(exact[i].argmax()) for i, lp in enumerate(lps[1:]))
    assert scored.token_ids == cached.token_ids
    engine.close()
