"""Model-free drafts: prompt lookup (`magicdec.spec.ngram`), suffix matching (`magicdec.spec.suffix`), the
hybrid choice (`magicdec.spec.hybrid`), exact verification of deterministic drafts (`magicdec.spec.onehot`),
the offline replay (`magicdec.bench.lookup_sim`) and the copy-heavy workloads (`magicdec.bench.workloads`)."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

from magicdec.bench.corpora import Corpus, CorpusError
from magicdec.bench.lookup_sim import PROPOSERS, matching_cost, replay, replay_all
from magicdec.bench.workloads import WORKLOADS, build_workload, sentences
from magicdec.spec.hybrid import PLAIN, SELF, Choice, RoundCosts, SourceAcceptance, choose, choose_batch
from magicdec.spec.lookup import Proposal, append_batch, expected_accepted, propose_batch
from magicdec.spec.ngram import NgramProposer
from magicdec.spec.onehot import onehot_probs, verify_deterministic
from magicdec.spec.suffix import SuffixAutomaton, SuffixProposer, SuffixTrie
from magicdec.spec.verify import verify_sampling

# ---- prompt lookup ---------------------------------------------------------------------------------------


def ngram(tokens: list[int], **kw: object) -> NgramProposer:
    p = NgramProposer(**kw)  # type: ignore[arg-type]
    p.append(tokens)
    return p


def followed_before(text: list[int], tail: list[int], token: int, min_n: int, max_n: int) -> bool:
    return any(text[s : s + n] == tail[len(tail) - n :] and text[s + n] == token
               for n in range(min_n, min(max_n, len(tail)) + 1) for s in range(len(text) - n))


def brute_recent(text: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup by scanning: the longest n whose last n tokens occurred earlier (with a follower), the
    most recent such occurrence, up to k tokens after it: over the text, then over the tokens copied so far
    while the next one followed the context before."""
    for n in range(min(max_n, len(text) - 1), min_n - 1, -1):
        suffix = text[len(text) - n :]
        starts = [s for s in range(len(text) - n) if text[s : s + n] == suffix]
        if starts:
            out: list[int] = []
            pos = starts[-1] + n
            while len(out) < k:
                token = (text + out)[pos]
                if pos >= len(text) and not followed_before(text, (text + out)[-max_n:], token, min_n, max_n):
                    break
                out.append(token)
                pos += 1
            return out
    return []


def test_ngram_copies_what_followed_the_most_recent_match() -> None:
    p = ngram([1, 2, 3, 4, 5, 9, 1, 2, 3], min_n=1, max_n=3)
    prop = p.propose(3)
    assert prop.tokens == [4, 5, 9] and prop.match == 3 and prop.source == "ngram"
    assert ngram([1, 2, 7, 1, 2, 8, 1, 2], min_n=2, max_n=2).propose(1).tokens == [8]


def test_ngram_frequent_mode_takes_the_most_frequent_follower() -> None:
    text = [1, 2, 7, 1, 2, 7, 1, 2, 8, 1, 2]
    assert ngram(text, min_n=2, max_n=2, mode="recent").propose(1).tokens == [8]
    prop = ngram(text, min_n=2, max_n=2, mode="frequent").propose(1)
    assert prop.tokens == [7]
    assert prop.probs == [pytest.approx((2 + 1) / (3 + 2))]  # rule of succession: 2 of 3


def test_ngram_proposes_nothing_without_an_earlier_match() -> None:
    assert ngram([5, 6, 7, 8], min_n=1).propose(4) == Proposal(source="ngram")
    assert ngram([1, 2, 3, 1], min_n=2, max_n=3).propose(2).tokens == []
    assert ngram([1, 2, 3, 1], min_n=1, max_n=3).propose(2).tokens == [2, 3]
    assert ngram([1, 2, 1], min_n=1).propose(0).tokens == []


def test_ngram_matches_a_scan_and_is_incremental() -> None:
    rng = random.Random(0)
    for _ in range(40):
        text = [rng.randrange(4) for _ in range(rng.randrange(2, 80))]
        at_once = ngram(text, min_n=1, max_n=3)
        one_by_one = NgramProposer(min_n=1, max_n=3)
        for t in text:
            one_by_one.append([t])
        for k in (1, 3, 6):
            assert at_once.propose(k).tokens == brute_recent(text, k, 1, 3)
            assert one_by_one.propose(k) == at_once.propose(k)


def test_ngram_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(min_n=3, max_n=2)
    with pytest.raises(ValueError, match="mode"):
        NgramProposer(mode="oldest")


def test_batched_helpers_serve_each_request() -> None:
    ps = [ngram([1, 2, 3, 1, 2], min_n=1), ngram([4, 5, 4], min_n=1)]
    props = propose_batch(ps, [2, 0])
    assert props[0].tokens == [3, 1] and props[1].tokens == []
    append_batch(ps, [[3], [5, 6]])
    assert ps[1].tokens == [4, 5, 4, 5, 6]
    with pytest.raises(ValueError, match="one k per proposer"):
        propose_batch(ps, [1])


# ---- suffix matching -------------------------------------------------------------------------------------


def test_suffix_automaton_matches_and_counts_as_a_scan() -> None:
    rng = random.Random(1)
    for _ in range(20):
        text = [rng.randrange(3) for _ in range(50)]
        sa = SuffixAutomaton()
        for i, t in enumerate(text):
            sa.append([t])
            seen = text[: i + 1]
            n = len(seen)
            longest = max((L for L in range(1, n) if any(seen[j : j + L] == seen[n - L :] for j in range(n - L))),
                          default=0)
            assert sa.length[sa.match()] == longest
            for L in range(1, min(n, 5) + 1):
                state = 0
                for t2 in seen[n - L :]:
                    state = sa.next[state][t2]
                ends = [j + L - 1 for j in range(n - L + 1) if seen[j : j + L] == seen[n - L :]]
                assert sa.count[state] == len(ends)
                assert sa.last_end[state] == ends[-1]
                assert sa.prev_end[state] == (ends[-2] if len(ends) > 1 else -1)


def test_suffix_proposer_copies_a_repeated_span() -> None:
    span = list(range(10, 40))
    p = SuffixProposer(threshold=0.0)
    p.append([1, 2] + span + [3, 4] + span[:6])
    prop = p.propose(8)
    assert prop.tokens == span[6:14] and prop.match == 6 and prop.source == "suffix"


def test_suffix_proposer_scores_by_frequency_and_adapts_its_length() -> None:
    p = SuffixProposer(threshold=0.0, factor=8, prior=(1.0, 1.0))
    p.append([1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 4, 9, 1, 2])
    prop = p.propose(1)
    assert prop.tokens == [3] and prop.match == 3  # "9 1 2" was followed by 3 twice, by 4 (most recently) once
    assert prop.probs == [pytest.approx((2 + 1) / (3 + 2))]
    bolder = SuffixProposer(threshold=0.0, factor=8, prior=(4.0, 0.5))
    bolder.append(p.tokens)
    assert bolder.propose(1).probs == [pytest.approx((2 + 4) / (3 + 4.5))]
    bolder = SuffixProposer(threshold=0.0, factor=8, prior=(4.0, 0.5))
    bolder.append(p.tokens)
    assert bolder.propose(1).probs == [pytest.approx((2 + 4) / (3 + 4.5))]
    # the path's probability bounds the length: a confident path goes further than an unsure one
    sure, unsure = SuffixProposer(threshold=0.3), SuffixProposer(threshold=0.3)
    sure.append([5, 6, 7, 8, 9] * 4 + [5])
    unsure.append([5, 6, 1, 5, 7, 2, 5, 8, 3, 5])
    assert len(sure.propose(8)) > len(unsure.propose(8)) >= 0
    # a short match earns a short guess: at most ⌈factor · match⌉ tokens
    short = SuffixProposer(threshold=0.0, factor=2.0)
    short.append(list(range(20)) + [0])
    assert short.propose(8).match == 1 and len(short.propose(8)) == 2


def test_suffix_proposer_uses_the_shared_store_of_outputs() -> None:
    shared = SuffixTrie(depth=24, capacity=100)
    shared.add("a", list(range(100, 140)))
    p = SuffixProposer(shared, threshold=0.0, max_len=8)
    p.append([7, 8, 100, 101, 102])
    prop = p.propose(4)
    assert prop.tokens == [103, 104, 105, 106] and prop.source == "suffix-global"
    shared.add("b", list(range(200, 270)))  # 110 tokens > 100: the least recently used output goes
    assert list(shared.outputs) == ["b"] and p.propose(4).tokens == []


def trie_state(node: object) -> object:
    return (node.count, {t: trie_state(c) for t, c in sorted(node.children.items())})  # type: ignore[attr-defined]


def test_suffix_trie_eviction_leaves_the_other_outputs_as_they_were() -> None:
    both, only = SuffixTrie(depth=4), SuffixTrie(depth=4)
    both.add(1, [1, 2, 3, 1, 2])
    both.add(2, [2, 3, 4, 2, 3])
    only.add(2, [2, 3, 4, 2, 3])
    both.touch(1)  # now 2 is the least recently used …
    assert next(iter(both.outputs)) == 2
    both._remove(1)  # … but removing 1 must leave exactly 2's suffixes
    assert trie_state(both.root) == trie_state(only.root)


def test_suffix_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="threshold"):
        SuffixProposer(threshold=1.0)
    with pytest.raises(ValueError, match="depth"):
        SuffixProposer(SuffixTrie(depth=8), max_len=8)
    with pytest.raises(ValueError, match="pseudo-counts"):
        SuffixProposer(prior=(0.0, 1.0))


# ---- the hybrid choice -----------------------------------------------------------------------------------


def linear(per_position: float) -> RoundCosts:
    return RoundCosts(verify=lambda n: 1.0 + per_position * n, draft_step=None)


def test_expected_accepted_is_the_sum_of_prefix_products() -> None:
    assert expected_accepted([]) == 0.0
    assert expected_accepted([0.5, 0.5, 1.0]) == pytest.approx(0.5 + 0.25 + 0.25)


def test_hybrid_takes_a_confident_proposal_and_cuts_it_where_it_stops_paying() -> None:
    prop = Proposal([1, 2, 3, 4], [0.95, 0.95, 0.1, 0.9], "ngram", 4)
    c = choose(prop, SourceAcceptance(weight=1e9), linear(0.2), max_gamma=4)
    assert (c.source, c.n, c.tokens) == ("ngram", 2, (1, 2))
    assert c.rate == pytest.approx((1 + 0.95 + 0.95**2) / 1.4)


def test_hybrid_falls_back_to_plain_when_nothing_pays() -> None:
    prop = Proposal([1], [0.1], "ngram", 1)
    assert choose(prop, SourceAcceptance(), linear(0.5), max_gamma=4).source == PLAIN
    assert choose(None, SourceAcceptance(), linear(0.5), max_gamma=4) == Choice(PLAIN, 0, 1.0)


def test_hybrid_prefers_the_self_draft_where_the_text_is_new() -> None:
    costs = RoundCosts(verify=lambda n: 1.0 + 0.05 * n, draft_step=0.1)
    c = choose(Proposal(source="ngram"), SourceAcceptance(), costs, max_gamma=4, self_prior=0.8)
    assert c.source == SELF and c.n >= 2
    # and a sure copy over it
    sure = Proposal([5] * 4, [0.99] * 4, "suffix", 8)
    assert choose(sure, SourceAcceptance(), costs, max_gamma=4).source == "suffix"


def test_hybrid_learns_a_request_s_acceptance_per_source() -> None:
    prop = Proposal([1, 2, 3], [0.9, 0.9, 0.9], "ngram", 3)
    acc = SourceAcceptance()
    assert choose(prop, acc, linear(0.3), max_gamma=3).source == "ngram"
    for _ in range(10):
        acc.record("ngram", 3, 0)  # this request's n-gram drafts keep failing
    assert choose(prop, acc, linear(0.3), max_gamma=3).source == PLAIN
    assert acc.chance("suffix", 0.9) == 0.9  # other sources keep their own estimate
    with pytest.raises(ValueError, match="accepted"):
        acc.record("ngram", 2, 3)


def test_hybrid_batch_choice_bounds_each_request_and_runs_the_largest_self_gamma() -> None:
    costs = RoundCosts(verify=lambda n: 1.0 + 0.05 * n, draft_step=0.1)
    sure = Proposal([5] * 6, [0.99] * 6, "ngram", 6)
    choices, steps = choose_batch([sure, None, None], [SourceAcceptance() for _ in range(3)], costs, [3, 4, 0])
    assert choices[0].source == "ngram" and choices[0].n == 3  # cut to its bound
    assert choices[1].source == SELF and steps == choices[1].n
    assert choices[2].source == PLAIN and choices[2].n == 0


def test_hybrid_batch_choice_prices_the_padded_width_once_for_the_batch() -> None:
    """The verification is padded to the widest row: one row's long proposal makes every row's round cost its
    width. Where verifying is compute-bound (T_V grows with the width), seven rows that draft well with the
    model at γ 2 are not made to verify 8 wide for one row's 8-token proposal; where it is nearly free, the
    round goes wide and the others take the self-draft within it."""
    long = Proposal(list(range(8)), [0.9] * 8, "suffix", 8)
    accs = [SourceAcceptance() for _ in range(8)]
    for a in accs:
        for _ in range(10):
            a.record(SELF, 2, 2)  # the model draft is accepted throughout
    steep = RoundCosts(verify=lambda n: 1.0 + 0.5 * n, draft_step=0.2)
    choices, steps = choose_batch([long] + [None] * 7, accs, steep, [2] * 8, bounds=[8] * 8)
    assert max(c.n for c in choices) == 2 and steps == 2
    assert all(c.source == SELF for c in choices[1:])
    flat = RoundCosts(verify=lambda n: 1.0 + 0.01 * n, draft_step=0.2)
    choices, steps = choose_batch([long] + [None] * 7, accs, flat, [2] * 8, bounds=[8] * 8)
    assert choices[0].source == "suffix" and choices[0].n == 8 and steps == 2
    # a plan imposed by other requests (a fixed-γ self row of γ 3) is a floor
    choices, steps = choose_batch([long], accs[:1], steep, [2], bounds=[8], min_width=3, min_steps=3)
    assert choices[0].n >= 2 and steps <= 3


# ---- exactness: a deterministic draft is a one-hot draft distribution ------------------------------------


def target(vocab: int, rows: int, positions: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(positions, vocab, generator=g) * 1.5, -1).expand(rows, -1, -1)


def test_deterministic_verification_is_speculative_sampling_with_a_one_hot_draft() -> None:
    p = target(16, 64, 4, 0).clone()
    p[5, 0] = torch.nn.functional.one_hot(torch.tensor(3), 16).float()  # p(d) = 1: no residual mass
    d = torch.randint(0, 16, (64, 3), generator=torch.Generator().manual_seed(1))
    d[5, 0] = 3
    k1, t1 = verify_deterministic(d, p, torch.Generator().manual_seed(7))
    k2, t2 = verify_sampling(d, onehot_probs(d, 16), p, torch.Generator().manual_seed(7))
    assert torch.equal(k1, k2) and torch.equal(t1, t2)
    assert int(k1[5]) >= 1


def chi2(observed: torch.Tensor, probs: torch.Tensor) -> float:
    obs, keep = observed.double(), probs > 0
    assert obs[~keep].sum() == 0  # nothing the target gives no mass
    exp = probs[keep].double()
    return float(chisquare(obs[keep].numpy(), (exp / exp.sum() * obs.sum()).numpy()).pvalue)


def committed(k: torch.Tensor, nxt: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two committed tokens of each row of a round with γ = 2 (-1: the round committed one)."""
    first = torch.where(k >= 1, d[:, 0], nxt)
    second = torch.where(k >= 2, d[:, 1], torch.where(k == 1, nxt, -1))
    return first, second


def test_deterministic_drafts_keep_the_target_distribution() -> None:
    """χ²: the first committed token is distributed as p_1, the second (given the first was the draft) as
    p_2; for drafts the target likes, dislikes and never samples."""
    V, N = 12, 40000
    p = target(V, N, 3, 3)
    for d1, d2 in ((int(p[0, 0].argmax()), int(p[0, 1].argmax())), (int(p[0, 0].argmin()), 0), (0, 5)):
        d = torch.tensor([d1, d2]).expand(N, 2)
        k, nxt = verify_deterministic(d, p, torch.Generator().manual_seed(d1 * 13 + d2))
        first, second = committed(k, nxt, d)
        assert chi2(torch.bincount(first, minlength=V), p[0, 0]) > 1e-3
        after = second[(first == d1) & (second >= 0)]
        assert chi2(torch.bincount(after, minlength=V), p[0, 1]) > 1e-3


def test_the_chi_square_check_catches_a_sampler_that_keeps_the_draft_on_rejection() -> None:
    V, N = 12, 40000
    p = target(V, N, 2, 3)
    d1 = int(p[0, 0].argmax())
    g = torch.Generator().manual_seed(0)
    u = torch.rand(N, generator=g)
    wrong = torch.where(u < p[:, 0, d1], d1, torch.multinomial(p[:, 0], 1, generator=g).squeeze(1))
    assert chi2(torch.bincount(wrong, minlength=V), p[0, 0]) < 1e-6


# ---- offline replay and matching cost -------------------------------------------------------------------


def test_replay_accepts_the_prefix_equal_to_the_greedy_output() -> None:
    span = list(range(10, 30))
    prompt, output = [1] + span + [2] + span[:2], span[2:12]
    r = replay(NgramProposer(2, 4), prompt, output, k=4)
    # rounds: 4 accepted + 1, 4 + 1 → 10 tokens in 2 rounds
    assert (r.rounds, r.accepted, r.drafted, r.tokens) == (2, 8, 8, 10)
    assert r.mean_accepted == 4.0 and r.tokens_per_round == 5.0
    none = replay(NgramProposer(2, 4), [1, 2, 3], [7, 8, 9], k=4)
    assert (none.rounds, none.accepted, none.proposed) == (3, 0, 0)
    with pytest.raises(ValueError, match="k must be"):
        replay(NgramProposer(), [1], [2], k=0)


def test_replay_through_the_hybrid_choice_drafts_only_what_pays() -> None:
    rng = random.Random(2)
    text = [rng.randrange(6) for _ in range(400)]
    prompt, output = text[:300], text[300:]
    free = replay(NgramProposer(1, 3), prompt, output, k=6)
    cheap = replay(NgramProposer(1, 3), prompt, output, k=6, costs=linear(0.0))
    dear = replay(NgramProposer(1, 3), prompt, output, k=6, costs=linear(5.0))
    assert free.drafted > 0 and dear.drafted == 0 and dear.rounds == len(output)  # nothing pays: plain steps
    assert 0 < cheap.drafted and cheap.speedup(0.0) >= 1.0


def test_periodic_text_is_copied_on_at_a_bounded_update_cost() -> None:
    p = SuffixProposer()
    for _ in range(500):
        p.append([7, 8])
        assert p.automaton.chain <= p.automaton.max_walk
    assert p.propose(4).tokens == [7, 8, 7, 8]
    assert ngram([1, 2, 3] * 3).propose(7).tokens == [1, 2, 3, 1, 2, 3, 1]


def test_replay_with_a_shared_store_learns_from_earlier_outputs() -> None:
    out = list(range(50, 70))
    pairs = [([1, 2, 3], out), ([4, 5, 6], out)]
    shared = SuffixTrie()
    with_store = replay_all(lambda: SuffixProposer(shared, threshold=0.0), pairs, 8, shared)
    alone = replay_all(PROPOSERS["suffix"], pairs, 8)
    assert alone.accepted == 0 and with_store.accepted > 0


def test_matching_cost_reports_a_round_per_batch() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(50) for _ in range(300)] for _ in range(3)]
    r = matching_cost(PROPOSERS["suffix"], prompts, [p[:40] for p in prompts], k=4, rounds=5)
    assert r["round_s_mean"] > 0 and r["round_s_max"] >= r["round_s_median"]


# ---- workloads --------------------------------------------------------------------------------------------


def test_sentences_are_cut_where_they_end() -> None:
    text = "--If Harriet were vain, it was her doing. (He saw Mr. Knightley!) “Is it so?” she said."
    assert sentences(text) == ["If Harriet were vain, it was her doing.", "He saw Mr. Knightley!", "“Is it so?”"]


def test_workload_arguments_are_checked() -> None:
    corpus = Corpus("one", ())
    with pytest.raises(CorpusError, match="unknown workload"):
        build_workload("poetry", None, corpus, 1024, 1)
    with pytest.raises(CorpusError, match="split"):
        build_workload("qa", None, corpus, 1024, 1, split="test")


@pytest.fixture(scope="module")
def smol_tokenizer() -> object:
    from magicdec.loading import load_model

    return load_model(None, device="cpu").tokenizer


@pytest.mark.slow
def test_workloads_have_their_copy_structure(smol_tokenizer: object, austen: Corpus) -> None:
    """With SmolLM2's tokenizer and chat template: every prompt fits its context, answers to copy are in the
    passage, and "tune" and "eval" passages come from different halves of the books."""
    tok = smol_tokenizer
    books = austen.subset(["northangerabbey", "persuasion"])  # the two shortest: tokenizing takes seconds
    halves = {d.name: len(d.text) / 2 for d in books}
    for name in WORKLOADS:
        prompts = build_workload(name, tok, books, 2048, 2, seed=0, split="eval")
        assert len(prompts) == 2
        for p in prompts:
            if name == "continuation":
                assert len(p.tokens) == 2048
                continue
            text = tok.decode(p.tokens)  # type: ignore[attr-defined]
            assert 1024 <= len(p.tokens) <= 2048 and p.passage in text and "<|im_start|>" not in text
            assert p.offset >= halves[p.document] - 1
            if name in ("qa", "revise"):
                assert p.reference and p.passage.count(p.reference) >= 1
            if name == "revise":
                assert text.count(p.reference) == 2  # in the passage, and again to revise
            if name == "chat":
                first, second = sentences(p.reference)[0], p.reference[len(sentences(p.reference)[0]) + 1 :]
                assert text.count(first) == 2 and text.count(second) == 2  # the passage and an earlier turn
    tune = build_workload("qa", tok, books, 2048, 2, seed=0, split="tune")
    assert all(p.offset < halves[p.document] for p in tune)
    again = build_workload("qa", tok, books, 2048, 2, seed=0, split="tune")
    assert [p.tokens for p in again] == [p.tokens for p in tune]
    # the built-in tokenizer: a quote from the passage is found by both proposers in the prompt itself
    q = build_workload("qa", tok, books, 2048, 1, seed=1)[0]
    quote = tok.encode(" " + q.reference, add_special_tokens=False)  # type: ignore[attr-defined]
    for make in (PROPOSERS["ngram"], PROPOSERS["suffix"]):
        r = replay(make(), q.tokens + quote[:3], quote[3:], k=8)
        assert r.mean_accepted >= 2.0
