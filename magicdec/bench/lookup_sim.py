"""Offline measurements of model-free drafts: acceptance replayed along a known greedy output, and the
matching cost per round at a batch of long contexts.

`replay` runs a proposer the way the engine would under greedy verification without running the model:
each round it proposes up to k tokens from the prompt and the output so far, the longest prefix equal to
the greedy output is accepted, and the accepted tokens plus the next one (the target's own token) are
committed. Greedy verification accepts exactly that prefix, so the accepted lengths are those a real run
with this proposer would get on this output. `matching_cost` times a batch of proposers' rounds (propose
and append per request) to compare with a decode step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from magicdec.spec.hybrid import RoundCosts, SourceAcceptance, choose
from magicdec.spec.lookup import Proposer
from magicdec.spec.ngram import NgramProposer
from magicdec.spec.suffix import SuffixProposer, SuffixTrie

ProposerFactory = Callable[[], Proposer]

PROPOSERS: dict[str, ProposerFactory] = {
    "ngram": lambda: NgramProposer(2, 4, "recent"),
    "ngram-frequent": lambda: NgramProposer(2, 4, "frequent"),
    "ngram-1": lambda: NgramProposer(1, 4, "recent"),
    "suffix": lambda: SuffixProposer(),
}


@dataclass(slots=True)
class Replay:
    """Totals over replayed outputs: rounds, rounds with a non-empty proposal, drafted and accepted
    tokens, output tokens."""

    rounds: int = 0
    proposed: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    per_output: list[float] = field(default_factory=list)  # mean accepted per round, per output

    def add(self, other: Replay) -> None:
        self.rounds += other.rounds
        self.proposed += other.proposed
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.tokens += other.tokens
        self.per_output.extend(other.per_output)

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per round (every round, those without a proposal too)."""
        return self.accepted / max(self.rounds, 1)

    @property
    def tokens_per_round(self) -> float:
        """Tokens committed per verification forward (the plain step's 1, plus the accepted drafts)."""
        return self.tokens / max(self.rounds, 1)

    @property
    def acceptance(self) -> float:
        """Accepted over drafted tokens."""
        return self.accepted / max(self.drafted, 1)

    def speedup(self, per_position: float) -> float:
        """Tokens per plain-step time if verifying n drafts costs 1 + per_position · n plain steps (matching
        and the bookkeeping of a round left out)."""
        return self.tokens / max(self.rounds + per_position * self.drafted, 1e-9)

    def summary(self) -> dict[str, float]:
        return {"mean_accepted": round(self.mean_accepted, 3), "tokens_per_round": round(self.tokens_per_round, 3),
                "acceptance": round(self.acceptance, 3), "proposal_rate": round(self.proposed / max(self.rounds, 1), 3),
                "rounds": self.rounds}


def replay(proposer: Proposer, prompt: Sequence[int], output: Sequence[int], k: int,
           costs: RoundCosts | None = None) -> Replay:
    """Greedy verification of `proposer`'s drafts (up to k a round) along `output`, the greedy continuation
    of `prompt` (see the module docstring). With `costs`, each round's proposal goes through the hybrid
    choice (`magicdec.spec.hybrid.choose`, the request's acceptance learned as it goes): cut where it stops
    paying for its verification, or a plain step."""
    if k < 1:
        raise ValueError(f"k must be ≥ 1 draft token, got {k}")
    proposer.append(prompt)
    learned = SourceAcceptance()
    r = Replay()
    i = 0
    while i < len(output):
        prop = proposer.propose(min(k, len(output) - i - 1)) if i + 1 < len(output) else None
        if prop is not None and costs is not None:
            prop = prop.cut(choose(prop, learned, costs, k).n)
        drafted = prop.tokens if prop is not None else []
        a = 0
        while a < len(drafted) and drafted[a] == output[i + a]:
            a += 1
        if prop is not None:
            learned.record(prop.source, len(drafted), a)
        proposer.append(output[i : i + a + 1])
        r.rounds += 1
        r.proposed += bool(drafted)
        r.drafted += len(drafted)
        r.accepted += a
        i += a + 1
    r.tokens = len(output)
    r.per_output.append(r.mean_accepted)
    return r


def replay_all(factory: ProposerFactory, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], k: int,
               shared: SuffixTrie | None = None, costs: RoundCosts | None = None) -> Replay:
    """`replay` over (prompt, output) pairs, a fresh proposer each; with `shared`, each output then joins
    the global trie (the suffix proposer's store of recent outputs), in order."""
    total = Replay()
    for j, (prompt, output) in enumerate(pairs):
        total.add(replay(factory(), prompt, output, k, costs))
        if shared is not None:
            shared.add(j, output)
    return total


def matching_cost(factory: ProposerFactory, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                  k: int, rounds: int) -> dict[str, float]:
    """Seconds per round for a batch of proposers, one per prompt: each round every request proposes up to k
    tokens and appends its committed ones (the accepted prefix against its `continuations` row, then the
    next token). Also the one-time seconds to index the prompts."""
    t0 = time.perf_counter()
    proposers = [factory() for _ in prompts]
    for p, prompt in zip(proposers, prompts):
        p.append(prompt)
    build = time.perf_counter() - t0
    at = [0] * len(prompts)
    times = []
    accepted = 0
    for _ in range(rounds):
        t = time.perf_counter()
        for j, p in enumerate(proposers):
            cont = continuations[j]
            i = at[j]
            drafted = p.propose(k).tokens
            a = 0
            while a < len(drafted) and i + a < len(cont) and drafted[a] == cont[i + a]:
                a += 1
            p.append(cont[i : i + a + 1])
            at[j] = i + a + 1
            accepted += a
        times.append(time.perf_counter() - t)
    times.sort()
    return {"build_s": build, "round_s_mean": sum(times) / len(times), "round_s_median": times[len(times) // 2],
            "round_s_max": times[-1], "accepted_per_request_round": accepted / (rounds * len(prompts))}
