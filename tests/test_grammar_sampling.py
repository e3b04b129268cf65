"""Structured output keeps the masked target's distribution under speculative sampling: χ² of whole short
outputs of a small grammar (three tokens, each from its own set: a Lark grammar of token ids), sampled with a
draft model proposing two tokens a round (the grammar masks the draft's proposals and every verified
position, the matcher advanced through the drafts before it), and sampled plainly, against the target's
distribution masked to the grammar and renormalised at each position, computed directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_spec_sampling import chi2_pvalue

from conftest import full_logits, random_prompts, tiny_config, write_checkpoint
from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.runtime.grammar import lark_grammar

pytest.importorskip("llguidance")

VOCAB, N = 32, 2000
SETS = ([3, 4, 5, 6], [5, 6, 7, 8, 9, 20], [3, 7, 8, 9])


def sample(llm: LLM, prompt: list[int], params: list[SamplingParams], spec: SpecConfig | None) -> tuple[
        torch.Tensor, float | None]:
    engine = Engine(llm=llm, spec=spec, max_num_seqs=64, max_num_batched_tokens=4096, quiet=True)
    ids = [engine.add_request(prompt, p) for p in params]
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    rate = engine.stats.spec.acceptance_rate
    engine.close()
    counts = torch.zeros(*(len(s) for s in SETS))
    for i in ids:
        assert len(outs[i]) == 3 and all(t in s for t, s in zip(outs[i], SETS)), outs[i]
        counts[tuple(s.index(t) for t, s in zip(outs[i], SETS))] += 1
    return counts, rate


def byte_level_words(path: Path) -> Path:
    """The checkpoint's word tokenizer with a byte-level decoder (the kind llguidance reads): a token's bytes
    are its word, "w5"."""
    from tokenizers import Tokenizer, decoders

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_sampling_with_a_grammar_keeps_the_masked_distribution(tmp_path: Path, threads: None) -> None:
    torch.set_num_threads(1)
    target = byte_level_words(write_checkpoint(tmp_path / "t", tiny_config(vocab_size=VOCAB), seed=5))
    draft = write_checkpoint(tmp_path / "d", tiny_config(vocab_size=VOCAB, n_layers=1), seed=6)
    llm = LLM(target, device="cpu")
    prompt = random_prompts(1, [30], VOCAB - 5, seed=3)[0]
    grammar = lark_grammar("start: a b c\n" + "".join(f"{n}: {' | '.join(f'<[{t}]>' for t in s)}\n"
                                                     for n, s in zip("abc", SETS)))
    params = [SamplingParams(max_new_tokens=3, seed=s, temperature=1.0, grammar=grammar) for s in range(N)]
    spec = SpecConfig(method="draft", drafter="full", draft_model=str(draft), gamma=2)
    speculative, rate = sample(llm, prompt, params, spec)
    assert rate is not None and 0.05 < rate < 0.99
    plain, _ = sample(llm, prompt, params, None)

    def masked(seqs: list[list[int]], allowed: list[int]) -> torch.Tensor:
        logits = full_logits(llm.model, seqs)[:, -1].double()
        return torch.softmax(logits[:, allowed], -1)  # the target masked to the set, renormalised

    a, b, c = SETS
    p1 = masked([prompt], a)[0]
    p2 = masked([prompt + [x] for x in a], b)
    p3 = masked([prompt + [x, y] for x in a for y in b], c).view(len(a), len(b), len(c))
    joint = p1[:, None, None] * p2[:, :, None] * p3
    for counts in (speculative, plain):
        assert chi2_pvalue(counts, joint) > 1e-3
        assert chi2_pvalue(counts.sum((0, 2)), joint.sum((0, 2))) > 1e-3  # the second word alone
    # the test sees the target: the same sets drawn uniformly are far from what was sampled
    assert chi2_pvalue(speculative, torch.full_like(joint, 1 / joint.numel())) < 1e-6
