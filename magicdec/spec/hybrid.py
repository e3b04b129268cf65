"""The hybrid drafter's choice, per request and round: the model-free proposal, the sparse self-draft (or
draft model), or a plain step — whichever is expected to commit the most tokens per unit of time.

Pure logic: the engine supplies the round's costs (`RoundCosts`, from the cost model, in units of a plain
decoding step T_T of the batch as it is) and the proposals; each request keeps its learned acceptance per
source (`SourceAcceptance`).

For each option, expected tokens committed per T_T (the bonus token counted):
- plain: 1 / T_V(0) (= 1);
- model-free, keeping the first m tokens of the proposal: (1 + Σ_{j ≤ m} Π_{i ≤ j} a_i) / (T_V(m) + M),
  a_i the chance that token i is accepted (below) and M the measured matching cost of a request's proposal;
- self-draft at γ ≤ max_gamma: (1 + Σ_{j ≤ γ} α^j) / (γ · T_D + T_V(γ)), α its per-position acceptance.
The largest rate wins; ties go to the cheaper option (plain, then model-free, then self-draft).

Learned acceptance (`SourceAcceptance`): per request and source, Beta-like counts of draft positions
tried (up to and including the first rejection) and accepted, older rounds forgotten geometrically (like
`magicdec.costmodel.policy.AlphaEstimate`). A position's chance blends the source's own estimate for it
(the proposer's per-token probability, or the self-draft's prior α) with what this request observed:
a_i = (w · p_i + accepted) / (w + tried), where the estimate's weight w starts at `weight` positions and is
forgotten like the counts. A new request follows its proposer; after a few rounds its own record decides.

T_V and T_D are the batch's (the cost model's view, as `AutoGamma` takes it: every row doing the same);
the engine pays the self-draft's γ steps once for the batch (the largest γ chosen), and verifies all rows
in one forward of ragged lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from magicdec.spec.lookup import Proposal, expected_accepted

PLAIN, SELF = "plain", "self"
FORGET = 0.9  # per round, as AlphaEstimate
WEIGHT = 4.0  # a source's own estimate weighs as much as 4 observed positions
SELF_PRIOR = 0.8  # the self-draft's acceptance before any round (the MagicDec paper's StreamingLLM-512 figure)


class SourceAcceptance:
    """One request's acceptance per draft source (see the module docstring)."""

    def __init__(self, weight: float = WEIGHT, forget: float = FORGET) -> None:
        if weight <= 0 or not 0 < forget <= 1:
            raise ValueError(f"acceptance estimates need weight > 0 and forget in (0, 1], got weight={weight}, "
                             f"forget={forget}")
        self.weight, self.forget = weight, forget
        self.counts: dict[str, tuple[float, float, float]] = {}  # source → (accepted, tried, the prior's weight)

    def record(self, source: str, drafted: int, accepted: int) -> None:
        """A round in which `source` drafted `drafted` tokens and the target accepted `accepted` of them."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted drafts must be in 0 … {drafted}, got {accepted}")
        if drafted == 0:
            return
        a, t, w = self.counts.get(source, (0.0, 0.0, self.weight))
        f = self.forget
        self.counts[source] = (f * a + accepted, f * t + min(accepted + 1, drafted), f * w)

    def chance(self, source: str, prior: float) -> float:
        """A draft position's chance of acceptance: `prior` (the source's own estimate) blended with this
        request's record for the source."""
        a, t, w = self.counts.get(source, (0.0, 0.0, self.weight))
        return min(max((w * prior + a) / (w + t), 0.0), 1.0)


@dataclass(frozen=True, slots=True)
class RoundCosts:
    """A round's costs in plain decoding steps of the batch (T_T = 1): `verify(n)` = T_V(n)/T_T for n draft
    positions per row (verify(0) = 1: a plain step); `draft_step` = T_D/T_T, one step of the self-draft (None:
    no self-draft in this engine); `match` = a request's measured matching seconds per round / T_T."""

    verify: Callable[[int], float]
    draft_step: float | None = None
    match: float = 0.0


@dataclass(frozen=True, slots=True)
class Choice:
    """What a request drafts this round: `source` ("plain", "self", or the proposal's source) and `n` draft
    positions to verify (0 for plain); `tokens`: the model-free draft (the proposal cut to n), else empty;
    `rate`: expected tokens committed per plain step."""

    source: str
    n: int
    rate: float
    tokens: tuple[int, ...] = ()


def choose(proposal: Proposal | None, acceptance: SourceAcceptance, costs: RoundCosts, max_gamma: int,
           self_prior: float = SELF_PRIOR) -> Choice:
    """The best of plain, the proposal (cut to its best length) and the self-draft at its best γ ≤ max_gamma."""
    best = Choice(PLAIN, 0, 1.0 / costs.verify(0))
    if proposal is not None and len(proposal):
        chances = [acceptance.chance(proposal.source, p) for p in proposal.probs]
        for m in range(1, len(proposal) + 1):
            rate = (1.0 + expected_accepted(chances[:m])) / (costs.verify(m) + costs.match)
            if rate > best.rate:
                best = Choice(proposal.source, m, rate, tuple(proposal.tokens[:m]))
    if costs.draft_step is not None:
        alpha = acceptance.chance(SELF, self_prior)
        for g in range(1, max_gamma + 1):
            rate = (1.0 + expected_accepted([alpha] * g)) / (g * costs.draft_step + costs.verify(g))
            if rate > best.rate:
                best = Choice(SELF, g, rate)
    return best


def choose_batch(proposals: Sequence[Proposal | None], acceptances: Sequence[SourceAcceptance], costs: RoundCosts,
                 max_gammas: Sequence[int], self_prior: float = SELF_PRIOR) -> tuple[list[Choice], int]:
    """Each request's choice, and the self-draft's steps this round (the largest γ chosen; 0: no draft
    steps). `max_gammas`: per request, the most positions it may verify (its own bound, and its remaining
    tokens − 1)."""
    if not len(proposals) == len(acceptances) == len(max_gammas):
        raise ValueError(f"one proposal, acceptance record and bound per request: got {len(proposals)}, "
                         f"{len(acceptances)} and {len(max_gammas)}")
    choices = []
    for prop, acc, g in zip(proposals, acceptances, max_gammas):
        prop = prop.cut(g) if prop is not None and len(prop) > g else prop
        choices.append(choose(prop, acc, costs, g, self_prior) if g > 0 else Choice(PLAIN, 0, 1.0))
    steps = max((c.n for c in choices if c.source == SELF), default=0)
    return choices, steps


class MatchCost:
    """Measured matching seconds per request per round (proposal and append), older rounds forgotten."""

    def __init__(self, forget: float = 0.7) -> None:
        self.forget, self.seconds = forget, 0.0
        self._seen = False

    def record(self, seconds: float, requests: int) -> None:
        if requests <= 0:
            return
        s = seconds / requests
        self.seconds = s if not self._seen else self.forget * self.seconds + (1 - self.forget) * s
        self._seen = True
