"""`--gamma auto`: choose γ every round from the cost model, what this run has measured, and how sure
it is of it.

Each round the policy asks the cost model for T_T, T_D and T_V(γ) of the batch as it is now — its size
and every sequence's current context — and picks the γ (0 = a plain decoding step) that maximises
Eq. 1's speedup Ω(γ, α)·T_T / (γ·T_D + T_V(γ) + R).

- α: per sequence and round, the draft positions tried (up to and including the first rejection) and
  those accepted, older rounds forgotten geometrically, from a prior worth a few draft positions.
- Step costs (`StepCosts`): every round reports how long drafting, verification and the rest took. A
  Kalman filter splits the measured/predicted times into the machine's level, which drifts from round
  to round (this VM's speed moves by 10-20% within minutes), and per kind of speculative step (a draft
  step, verification at each γ) a constant factor relative to a plain step, which is what the model may
  have wrong and what decides the choice. Kinds not yet timed borrow from those that have (the prior
  correlates neighbouring γ), and the filter knows how well each factor is known: a factor is pinned
  down by plain and speculative steps timed close together, not by one probe in a slow spell.
- The choice is Thompson sampling: one draw of the factors from what the run believes (at `EXPLORE` of
  its spread: full draws explored too much in simulation), and the γ fastest under that draw at the
  estimated α. Where one γ clearly wins it is taken almost always; near a tie, where
  the choice costs little either way, the candidates keep being tried, so the measurements that settle
  the tie keep coming. The draws come from a seeded generator: a run's choices are reproducible.
- The first round is a plain step (the baseline every choice is weighed against), and one in
  `plain_every` speculative rounds is too, so a cost model that flatters speculation is caught by the
  clock. γ climbs at most `CLIMB` above the largest γ already timed, and never drafts past the tokens
  the batch still needs (`max_new_tokens`).

How much this exploring costs is measured in simulation (`magicdec.bench.policy_sim`, tests and
benchmarks/autogamma_sim.py) as well as on the machine (docs/cost-model.md).
"""

from __future__ import annotations

import math
import random

from magicdec.costmodel import CostModel, omega
from magicdec.engine.state import BatchState

ALPHA_PRIOR = 0.8  # StreamingLLM-512 self-speculation accepts 0.79-0.84 on PG-19 (MagicDec, Llama-3.1-8B)
PRIOR_TRIALS = 4.0  # the prior weighs as much as 4 observed draft positions: the text decides within rounds
FORGET = 0.9  # per round: an estimate follows the text within ~10 rounds
STEP_NOISE = 0.10  # σ of log(measured / predicted) of one step, beyond the machine's drift
DRIFT = 0.05  # σ per round of the drift of the machine's log-speed
FACTOR_PRIOR = 0.3  # σ of a kind of step's log cost relative to a plain step, against the model, a priori
NEIGHBOUR = 0.95  # a priori correlation of those of verification at γ and γ + 1 (0.5: drafting and γ = 1)
EXPLORE = 0.5  # factors are drawn at this fraction of the filter's spread (a tempered Thompson sampling)
OVERHEAD_FORGET = 0.7  # the bookkeeping time per round, followed within a few rounds
PLAIN_EVERY = 32  # while speculating, one round in this many is a plain step
CLIMB = 2  # γ rises at most this far above the largest γ whose verification has been timed


class AlphaEstimate:
    def __init__(self, prior: float = ALPHA_PRIOR, weight: float = PRIOR_TRIALS, forget: float = FORGET) -> None:
        self.accepted, self.trials, self.forget = prior * weight, weight, forget

    @property
    def value(self) -> float:
        return min(max(self.accepted / self.trials, 0.0), 0.999)

    def update(self, gamma: int, accepted: list[int]) -> None:
        self.accepted = self.forget * self.accepted + sum(accepted)
        self.trials = self.forget * self.trials + sum(min(k + 1, gamma) for k in accepted)


class StepCosts:
    """A Kalman filter over this machine's step times against the cost model's predictions, in logs:
    state 0 is the machine's level (a plain step's measured/predicted time), drifting from round to round;
    then, per kind of speculative step — a draft step, verification at γ = 1 … max_gamma — its cost
    relative to a plain step's, a constant the model may have wrong (a priori within `FACTOR_PRIOR`,
    neighbouring kinds alike). A plain step observes the level; a draft step or a verification, the level
    plus its factor. Only the factors decide which γ is fastest, and what pins them down is how kinds of
    step compare at moments close in time: a spell of slow machine moves the level, not the factors."""

    def __init__(self, max_gamma: int, noise: float = STEP_NOISE, drift: float = DRIFT,
                 prior: float = FACTOR_PRIOR, neighbour: float = NEIGHBOUR) -> None:
        self.noise, self.drift = noise, drift
        n = max_gamma + 2  # level, draft, verification at 1 … max_gamma
        corr = [[1.0] * (n - 1) for _ in range(n - 1)]  # draft ~ 0.5 · verify(1); verifications AR(1)
        for i in range(1, n - 1):
            for j in range(1, n - 1):
                corr[i][j] = neighbour ** abs(i - j)
            corr[0][i] = corr[i][0] = 0.5 * neighbour ** (i - 1)
        self.x = [0.0] * n
        self.P = [[0.0] * n for _ in range(n)]
        self.P[0][0] = 1.0  # the level: anything within a factor of e, a priori
        for i in range(1, n):
            for j in range(1, n):
                self.P[i][j] = prior * prior * corr[i - 1][j - 1]
        self.timed: set[int] = set()  # γ whose verification has been observed

    @staticmethod
    def kind(gamma: int | None) -> int:
        """State index of a draft step (None) or of verification at γ."""
        return 1 if gamma is None else gamma + 1

    def factor(self, gamma: int | None) -> float:
        return math.exp(self.x[self.kind(gamma)])

    @property
    def level(self) -> float:
        return math.exp(self.x[0])

    def round(self) -> None:
        """A round has passed: the machine may have drifted."""
        self.P[0][0] += self.drift * self.drift

    def observe(self, measured: float, predicted: float, gamma: int | None = None, plain: bool = False) -> None:
        """One step's time: a plain step, a draft step (gamma None), or verification at γ."""
        if not (measured > 0 and predicted > 0):
            return
        idx = [0] if plain else [0, self.kind(gamma)]
        if not plain and gamma is not None:
            self.timed.add(gamma)
        P, n = self.P, len(self.x)
        ph = [sum(P[i][j] for j in idx) for i in range(n)]  # P hᵀ
        s = sum(ph[j] for j in idx) + self.noise * self.noise
        innovation = math.log(measured / predicted) - sum(self.x[j] for j in idx)
        for i in range(n):
            self.x[i] += ph[i] * innovation / s
        for i in range(n):
            for j in range(n):
                P[i][j] -= ph[i] * ph[j] / s

    def sample_factors(self, rng: random.Random, spread: float = 1.0) -> list[float]:
        """A draw of every factor (draft, verification at 1 … max_gamma) from the filter's belief, its
        spread scaled by `spread`."""
        n = len(self.x) - 1
        L = _cholesky([row[1:] for row in self.P[1:]])
        z = [spread * rng.gauss(0.0, 1.0) for _ in range(n)]
        return [math.exp(self.x[i + 1] + sum(L[i][k] * z[k] for k in range(i + 1))) for i in range(n)]


def _cholesky(a: list[list[float]]) -> list[list[float]]:
    """Lower-triangular L with L Lᵀ = a, for a symmetric positive semi-definite a (pivots below 0 → 0)."""
    n = len(a)
    L = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            s = a[i][j] - sum(L[i][k] * L[j][k] for k in range(j))
            if i == j:
                L[i][j] = math.sqrt(max(s, 0.0))
            else:
                L[i][j] = s / L[j][j] if L[j][j] > 1e-12 else 0.0
    return L


class AutoGamma:
    """A `GammaPolicy` driven by a `CostModel`, calibrated by the run's own step times."""

    def __init__(self, cost: CostModel, max_gamma: int, alpha: AlphaEstimate | None = None,
                 plain_every: int = PLAIN_EVERY, max_new_tokens: int | None = None, seed: int = 0) -> None:
        self.cost, self.max_gamma, self.max_new_tokens = cost, max_gamma, max_new_tokens
        self.alpha = alpha or AlphaEstimate()
        self.costs = StepCosts(max_gamma)
        self.overhead: float | None = None  # seconds per round beyond drafting and verifying, / level
        self.rng = random.Random(seed)
        self.plain_every, self._spec_rounds, self._plain_timed = plain_every, 0, False
        self.predicted: list[float] = []  # the speedup expected of each choice (at the mean belief), for diagnostics
        self._step: tuple[int, list[int]] | None = None

    def speedups(self, state: BatchState, factors: list[float], alpha: float) -> list[float]:
        """Predicted speedup over plain decoding of γ = 1 … the limit, given the factors (draft, verification
        at 1 … max_gamma) and α."""
        contexts = state.contexts()
        batch = len(contexts)
        t_target = self.cost.t_target(batch, contexts)
        t_draft = self.cost.t_draft(batch, contexts) * factors[0]
        overhead = self.cost.hardware.round_overhead_s if self.overhead is None else self.overhead
        return [omega(g, alpha) * t_target
                / (g * t_draft + self.cost.t_verify(batch, contexts, g) * factors[g] + overhead)
                for g in range(1, self._gamma_limit(state) + 1)]

    def choose(self, state: BatchState) -> int:
        """Thompson sampling: the γ that is fastest under one draw of the step costs from what has been
        measured (at the estimated α) — a γ is tried about as often as it may be the best, so near a tie
        the policy keeps comparing and where one γ clearly wins it takes it."""
        mean = [self.costs.factor(None), *(self.costs.factor(g) for g in range(1, self.max_gamma + 1))]
        expected = self.speedups(state, mean, self.alpha.value)
        drawn = self.speedups(state, self.costs.sample_factors(self.rng, EXPLORE), self.alpha.value)
        gamma = max(range(len(drawn)), key=drawn.__getitem__) + 1 if drawn and max(drawn) > 1.0 else 0
        if gamma and not self._plain_timed:
            gamma = 0  # measure the baseline first
        elif gamma:
            self._spec_rounds += 1
            if self._spec_rounds % self.plain_every == 0:
                gamma = 0  # and again now and then
        self.predicted.append(max([1.0, *expected]))
        contexts = state.contexts()
        self._step = (len(contexts), contexts)
        return gamma

    def _gamma_limit(self, state: BatchState) -> int:
        """γ climbs at most CLIMB above the largest γ verified so far (whose time it has measured), and
        never drafts past the tokens the longest-running live sequence still needs."""
        limit = min(self.max_gamma, max(self.costs.timed, default=0) + CLIMB)
        if self.max_new_tokens is not None:
            left = max((self.max_new_tokens - len(o.token_ids) for o in state.outputs if o.finish_reason is None),
                       default=1)
            limit = min(limit, left - 1)
        return limit

    def observe(self, gamma: int, accepted: list[int], seconds: tuple[float, float, float]) -> None:
        """After a round: accepted counts, and (draft, verify, rest) seconds; a plain step reports
        (0, step, 0)."""
        if self._step is None:
            return
        batch, contexts = self._step
        draft_s, verify_s, rest_s = seconds
        costs = self.costs
        costs.round()
        if gamma == 0:
            self._plain_timed = True
            costs.observe(verify_s, self.cost.t_target(batch, contexts), plain=True)
            return
        self.alpha.update(gamma, accepted)
        costs.observe(draft_s / gamma, self.cost.t_draft(batch, contexts))
        costs.observe(verify_s, self.cost.t_verify(batch, contexts, gamma), gamma)
        rest = rest_s / costs.level  # bookkeeping, at the machine's level of speed
        f = OVERHEAD_FORGET
        self.overhead = rest if self.overhead is None else f * self.overhead + (1 - f) * rest
