"""Penalties, logit bias, min-p and min_tokens stay exact under speculation: position j of a verification is
penalised by the committed tokens and the drafts before it, the draft applies the same rule, so greedy output
with speculation equals plain greedy output with the same penalties, and sampling keeps the penalised
target's distribution (χ²)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_spec_sampling import chi2_pvalue

from conftest import full_logits, random_prompts, tiny_config, write_checkpoint
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.runtime.penalties import TokenHistory
from magicdec.runtime.sampling import probabilities
from magicdec.spec.config import DraftTuning

PENALTIES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.8),
    "repetition": dict(repetition_penalty=1.6),
    "logit_bias": dict(logit_bias={7: 4.0, 11: -100.0}),
    "min_tokens": dict(min_tokens=20),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={5: 2.0}),
}
SPECS = {
    "draft-model": dict(method="draft", drafter="full", gamma=3),
    "self-streaming": dict(method="self", drafter="streaming", budget=32, sinks=4, gamma=3),
    "ngram": dict(method="self", drafter="ngram", gamma=4, tuning=DraftTuning(ngram_min=1)),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[LLM, Path]:
    target = write_checkpoint(tmp_path_factory.mktemp("t"), tiny_config(), seed=1)
    draft = write_checkpoint(tmp_path_factory.mktemp("d"), tiny_config(n_layers=1), seed=2)
    return LLM(target, device="cpu"), draft


def test_adjust_counts_the_drafts_before_each_position() -> None:
    """A verification's T positions adjusted at once equal each position adjusted after committing the drafts
    before it; the draft's form (drafts before position 0) agrees."""
    V = 50
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3,
                            logit_bias={3: 1.0}, min_tokens=4, max_new_tokens=10)
    prompt, output, drafts = [1, 2, 3, 9], [4, 4, 9], [9, 4, 17]
    logits = torch.randn(len(drafts) + 1, V)
    h = TokenHistory(params, prompt, V, torch.device("cpu"), stop_ids=[2])
    h.add(output)
    together = h.adjust(logits, drafts)
    for j in range(len(drafts) + 1):
        alone = TokenHistory(params, prompt, V, torch.device("cpu"), stop_ids=[2])
        alone.add(output + drafts[:j])
        torch.testing.assert_close(together[j], alone.adjust(logits[j : j + 1])[0], rtol=0, atol=0)
        torch.testing.assert_close(h.adjust(logits[j : j + 1], drafts[:j])[0], together[j], rtol=0, atol=0)
    assert torch.isinf(together[0, 2]) and not torch.isinf(together[1, 2])  # min_tokens: 3 + 1 output tokens
    assert not torch.equal(together, logits)


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
def test_greedy_with_penalties_equals_plain(pair: tuple[LLM, Path], penalty: str) -> None:
    llm, draft = pair
    prompts = random_prompts(3, [40, 70], 380, seed=4)
    params = SamplingParams(max_new_tokens=40, ignore_eos=penalty != "min_tokens", **PENALTIES[penalty])
    plain = [o.token_ids for o in llm.generate(prompts, params).outputs]
    untouched = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True)).outputs]
    if penalty != "min_tokens":
        assert plain != untouched  # the penalty changes the output: the comparison below can fail
    for name, kw in SPECS.items():
        spec = SpecConfig(**{**kw, **({"draft_model": str(draft)} if kw["method"] == "draft" else {})})
        out = llm.generate(prompts, params, spec)
        assert [o.token_ids for o in out.outputs] == plain, (penalty, name)
        assert out.stats.acceptance.draft_tokens > 0


def test_min_tokens_holds_back_eos(pair: tuple[LLM, Path]) -> None:
    """EOS is masked until min_tokens tokens are out (the model's EOS made likely by a logit bias)."""
    llm, _ = pair
    eos = next(iter(llm.eos_token_ids))
    prompt = random_prompts(1, [30], 380, seed=5)
    params = SamplingParams(max_new_tokens=30, logit_bias={eos: 100.0})
    assert len(llm.generate(prompt, params).outputs[0].token_ids) == 1
    out = llm.generate(prompt, SamplingParams(max_new_tokens=30, logit_bias={eos: 100.0}, min_tokens=6)).outputs[0]
    assert len(out.token_ids) == 7 and out.token_ids[-1] == eos and out.finish_reason == "stop"


def test_stop_strings_wait_for_min_tokens_as_in_vllm(pair: tuple[LLM, Path]) -> None:
    """vLLM's rule: a stop string counts only when text of a token past the first min_tokens completes it; one
    that ends within them is not searched for, one that begins within them and ends after cuts the text where
    it begins. The same with speculation on."""
    llm, _ = pair
    prompt = random_prompts(1, [30], 380, seed=7)
    base = dict(max_new_tokens=14, ignore_eos=True, presence_penalty=2.0)  # (no repeated words)
    tokens = llm.generate(prompt, SamplingParams(**base)).outputs[0].token_ids
    pieces = [llm.tokenizer.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    text = pieces[-1]
    # m: a token whose text " wNN" occurs once in the output, ending where the first m tokens' text ends
    m = next(i for i in range(3, 11) if text.count(pieces[i][len(pieces[i - 1]):]) == 1)
    own, edge = pieces[m][len(pieces[m - 1]):], len(pieces[m])
    across = text[edge - 2 : edge + 3]  # the last 2 characters of token m's text and 3 of token m + 1's
    assert text.count(across) == 1 and own.startswith(" ")
    spec = SpecConfig(method="self", drafter="ngram", gamma=4, tuning=DraftTuning(ngram_min=1))

    def run(stop: str, min_tokens: int, cfg: SpecConfig | None) -> tuple[str, int, str | None]:
        o = llm.generate(prompt, SamplingParams(**base, stop=(stop,), min_tokens=min_tokens), cfg).outputs[0]
        return o.text, len(o.token_ids), o.finish_reason

    for cfg in (None, spec):
        assert run(own, m - 1, cfg) == (pieces[m - 1], m, "stop")  # ends in token m's text: found
        assert run(own, m, cfg) == (text, len(tokens), "length")  # ends within the first m tokens': not searched
        assert run(across, m, cfg) == (text[: edge - 2], m + 1, "stop")  # begins within them, ends after: found
        assert run(across, m + 1, cfg) == (text, len(tokens), "length")


VOCAB, N = 32, 4000


def test_sampling_with_penalties_keeps_the_distribution(tmp_path: Path, threads: None) -> None:
    """χ² of three sampled tokens after a prompt (the second drafted by a draft model and verified with the
    first one counted, the third verified with both) against the penalised target's exact joint."""
    torch.set_num_threads(1)
    target = write_checkpoint(tmp_path / "t", tiny_config(vocab_size=VOCAB), seed=5)
    draft = write_checkpoint(tmp_path / "d", tiny_config(vocab_size=VOCAB, n_layers=1), seed=6)
    llm = LLM(target, device="cpu")
    prompt = random_prompts(1, [30], VOCAB - 5, seed=3)[0]
    pen = dict(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.5, logit_bias={4: 2.0}, min_p=0.02)
    engine = Engine(llm=llm, spec=SpecConfig(method="draft", drafter="full", draft_model=str(draft), gamma=2),
                    max_num_seqs=64, max_num_batched_tokens=4096, quiet=True)
    ids = [engine.add_request(prompt, SamplingParams(max_new_tokens=3, seed=s, temperature=1.0, ignore_eos=True,
                                                     **pen)) for s in range(N)]
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    rate = engine.stats.spec.acceptance_rate
    engine.close()
    assert rate is not None and 0.05 < rate < 0.99
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    for i in ids:
        a, b, c = outs[i]
        counts[a, b, c] += 1
    params = SamplingParams(max_new_tokens=3, temperature=1.0, **pen)

    def dist(seqs: list[list[int]]) -> torch.Tensor:
        logits = full_logits(llm.model, seqs)[:, -1]
        rows = []
        for s, lg in zip(seqs, logits):
            h = TokenHistory(params, prompt, VOCAB, torch.device("cpu"))
            h.add(s[len(prompt):])
            rows.append(probabilities(h.adjust(lg[None])[0], params))
        return torch.stack(rows)

    p1 = dist([prompt])[0]
    p2 = dist([prompt + [a] for a in range(VOCAB)])
    p3 = dist([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    for dims in ((0,), (2,), (0, 2)):  # (t2, t3), (t1, t2), t2
        assert chi2_pvalue(counts.sum(dims), joint.sum(dims)) > 1e-3, dims
    unpenalised = probabilities(full_logits(llm.model, [prompt])[:, -1], params)[0]
    assert chi2_pvalue(counts.sum((1, 2)), unpenalised) < 1e-6  # the test sees the penalties
