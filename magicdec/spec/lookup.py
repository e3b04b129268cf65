"""Model-free drafts: what a proposer hands the engine (`Proposal`), what every proposer offers
(`Proposer`), and the batched calls over the running requests (`propose_batch`, `append_batch`).

A proposer is per request and incremental: built once over the prompt (`append(prompt)`), told each
committed token afterwards (`append(tokens)`: the round's accepted drafts and the target's next token),
and asked before each round for up to k tokens (`propose(k)`) that the target then verifies like any
draft. Its cost per round does not grow with the context. It never needs rolling back: only committed
tokens are appended (a proposal is a read), so a rejected proposal leaves nothing to undo. A preempted
request keeps its proposer (its tokens do not change when its KV is recomputed).

A proposal is deterministic: in the rejection sampler its draft distribution is one-hot on each token
(`magicdec.spec.onehot`), so output stays exact whatever was proposed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Proposal:
    """Up to k tokens that may follow the request's text, and the proposer's own estimate, per token, of the
    chance it is right given the tokens before it are (`probs`, same length; `expected_accepted` turns them
    into the expected accepted length). `source` names who proposed ("ngram", "suffix", "suffix-global");
    `match` is the length of the context that matched (0: no match, empty proposal)."""

    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    source: str = ""
    match: int = 0

    def __post_init__(self) -> None:
        if len(self.probs) != len(self.tokens):
            raise ValueError(f"a proposal needs one probability per token: {len(self.tokens)} tokens, "
                             f"{len(self.probs)} probabilities")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def expected_accepted(self) -> float:
        return expected_accepted(self.probs)

    def cut(self, n: int) -> Proposal:
        """The first n tokens."""
        return Proposal(self.tokens[:n], self.probs[:n], self.source, self.match)


def expected_accepted(probs: Sequence[float]) -> float:
    """Expected number of drafts accepted when draft j is right with chance probs[j] given the ones before:
    Σ_j Π_{i ≤ j} probs[i] (verification accepts a prefix)."""
    total, run = 0.0, 1.0
    for p in probs:
        run *= p
        total += run
    return total


@dataclass(frozen=True, slots=True)
class Draft:
    """What a decoding request drafts this round: `source` "self" (the model draft: γ tokens), a model-free
    source ("ngram", "suffix", "suffix-global") with its `tokens`, or "" (nothing: a plain step)."""

    source: str = ""
    tokens: tuple[int, ...] = ()


class Proposer(Protocol):
    def append(self, tokens: Sequence[int]) -> None:
        """Committed tokens, in order (the prompt once, then each round's accepted drafts and next token)."""
        ...

    def propose(self, k: int) -> Proposal:
        """Up to k tokens to draft after the text so far (an empty proposal when nothing matches)."""
        ...


def propose_batch(proposers: Sequence[Proposer], ks: Sequence[int]) -> list[Proposal]:
    """One proposal per running request (k_i = 0 asks nothing of request i)."""
    if len(ks) != len(proposers):
        raise ValueError(f"one k per proposer: {len(proposers)} proposers, {len(ks)} values of k")
    return [p.propose(k) if k > 0 else Proposal() for p, k in zip(proposers, ks)]


def append_batch(proposers: Sequence[Proposer], committed: Sequence[Sequence[int]]) -> None:
    """After a round: each request's committed tokens (its accepted drafts and the target's next token)."""
    if len(committed) != len(proposers):
        raise ValueError(f"one token list per proposer: {len(proposers)} proposers, {len(committed)} lists")
    for p, tokens in zip(proposers, committed):
        p.append(tokens)
