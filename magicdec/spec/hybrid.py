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
tried (up to and including the first rejection) and accepted, the first position apart from the later ones,
older rounds forgotten geometrically (like `magicdec.costmodel.policy.AlphaEstimate`). A position's chance
blends the source's own estimate for it (the proposer's per-token probability, or the self-draft's prior α)
with what this request observed there: a_i = (w · p_i + accepted) / (w + tried), where the estimate's weight
w starts at `weight` positions and is forgotten like the counts. A new request follows its proposer; after a
few rounds its own record decides.

The round's cost is the batch's: one verification forward padded to its widest row, T_V(W), and S draft
steps, S · T_D (the cost model's view, calibrated as `AutoGamma` does), so the batch's width and steps are
chosen together (`choose_batch`); `choose` is the one-request case.
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
    """One request's acceptance per draft source (see the module docstring), kept apart for a draft's first
    position and its later ones: a model-free draft is often all or nothing (a wrong first token, or a
    copied span taken whole), which one rate per position would flatten into a short expected run."""

    def __init__(self, weight: float = WEIGHT, forget: float = FORGET) -> None:
        if weight <= 0 or not 0 < forget <= 1:
            raise ValueError(f"acceptance estimates need weight > 0 and forget in (0, 1], got weight={weight}, "
                             f"forget={forget}")
        self.weight, self.forget = weight, forget
        # source → (accepted, tried) at the first position, (accepted, tried) at later ones, the prior's weight
        self.counts: dict[str, tuple[float, float, float, float, float]] = {}

    def record(self, source: str, drafted: int, accepted: int) -> None:
        """A round in which `source` drafted `drafted` tokens and the target accepted `accepted` of them."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted drafts must be in 0 … {drafted}, got {accepted}")
        if drafted == 0:
            return
        a1, t1, a2, t2, w = self.counts.get(source, (0.0, 0.0, 0.0, 0.0, self.weight))
        f = self.forget
        later = min(accepted + 1, drafted) - 1  # later positions tried: up to and including the first rejection
        self.counts[source] = (f * a1 + min(accepted, 1), f * t1 + 1, f * a2 + max(accepted - 1, 0), f * t2 + later,
                               f * w)

    def chance(self, source: str, prior: float, position: int | None = None) -> float:
        """A draft position's chance of acceptance given the ones before it: `prior` (the source's own
        estimate) blended with this request's record for the source at that position (1: the first, later
        ones pooled; None: all positions pooled)."""
        a1, t1, a2, t2, w = self.counts.get(source, (0.0, 0.0, 0.0, 0.0, self.weight))
        a, t = (a1, t1) if position == 1 else (a2, t2) if position is not None else (a1 + a2, t1 + t2)
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
        chances = [acceptance.chance(proposal.source, p, j) for j, p in enumerate(proposal.probs, 1)]
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
                 max_gammas: Sequence[int], self_prior: float = SELF_PRIOR, bounds: Sequence[int] | None = None,
                 min_width: int = 0, min_steps: int = 0) -> tuple[list[Choice], int]:
    """Each request's choice, and the self-draft's steps this round (0: no draft steps), chosen for the batch.

    The round is one verification forward padded to its widest row and S draft steps for every row that
    drafts with the model, so its cost is T_V(W) + S · T_D whatever the other rows verify: the choice is the
    width W and the steps S ≤ W that commit the most expected tokens per unit of time over the whole batch,
    each request then taking its best option within them (its proposal cut to W, the self-draft at
    min(S, its γ), or a plain step). A request's own choice (`choose`) would price every row's width as the
    batch's, and let a few long proposals make everyone's round cost their width.
    `max_gammas`: per request, the most positions the self-draft may run (its γ; 0: none); `bounds`: per
    request, the most positions it may verify (default: its γ); `min_width`/`min_steps`: the width and
    draft steps other requests of the round impose anyway."""
    bounds = list(max_gammas) if bounds is None else list(bounds)
    if not len(proposals) == len(acceptances) == len(max_gammas) == len(bounds):
        raise ValueError(f"one proposal, acceptance record and bound per request: got {len(proposals)}, "
                         f"{len(acceptances)}, {len(max_gammas)} and {len(bounds)}")
    widest = max([min_width, *bounds], default=0)
    # per request: expected tokens committed (bonus included) at each width, by the proposal and by the draft
    lookup: list[list[tuple[float, int]]] = []  # [W] → (tokens, the proposal's length used)
    drafted: list[list[float]] = []  # [g] → tokens of the self-draft at γ g (index 0: a plain step)
    for prop, acc, g, b in zip(proposals, acceptances, max_gammas, bounds):
        best, row = (1.0, 0), [(1.0, 0)]
        chances = [acc.chance(prop.source, q, j) for j, q in enumerate(prop.probs[:b], 1)] if prop is not None else []
        for w in range(1, widest + 1):
            if w <= len(chances):
                best = max(best, (1.0 + expected_accepted(chances[:w]), w))
            row.append(best)
        lookup.append(row)
        alpha = acc.chance(SELF, self_prior) if costs.draft_step is not None else 0.0
        drafted.append([1.0 + expected_accepted([alpha] * k) for k in range(min(g, b) + 1)])
    steps_limit = max((len(d) - 1 for d in drafted), default=0) if costs.draft_step is not None else 0
    best_plan, best_rate = (min_width, min_steps), -1.0
    for w in range(min_width, widest + 1):
        for s in range(min_steps, min(max(steps_limit, min_steps), w) + 1):
            tokens = sum(max(lk[w][0], dr[min(s, len(dr) - 1)]) for lk, dr in zip(lookup, drafted))
            cost = costs.verify(w) + s * (costs.draft_step or 0.0) + (costs.match if w else 0.0)
            rate = tokens / cost
            if rate > best_rate * (1 + 1e-9):
                best_plan, best_rate = (w, s), rate
    w, s = best_plan
    cost = costs.verify(w) + s * (costs.draft_step or 0.0) + (costs.match if w else 0.0)
    choices = []
    for prop, lk, dr in zip(proposals, lookup, drafted):
        by_lookup, n = lk[w]
        g = min(s, len(dr) - 1)
        if dr[g] > by_lookup and g:
            choices.append(Choice(SELF, g, dr[g] / cost))
        elif n and prop is not None:
            choices.append(Choice(prop.source, n, by_lookup / cost, tuple(prop.tokens[:n])))
        else:
            choices.append(Choice(PLAIN, 0, 1.0 / cost))
    return choices, max((c.n for c in choices if c.source == SELF), default=0)


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
