"""`--gamma auto`: choose γ every round from the cost model, a running estimate of α, and the step
times this run actually measures.

Each round the policy asks the cost model for T_T, T_D and T_V(γ) of the batch as it is now — its size
and every sequence's current context — and picks the γ (0 = a plain decoding step) that maximises
Eq. 1's speedup Ω(γ, α)·T_T / (γ·T_D + T_V(γ) + R) at the acceptance rate estimated so far.

- α: per sequence and round, the draft positions tried (up to and including the first rejection) and
  those accepted, older rounds forgotten geometrically, from a prior worth a few rounds.
- Calibration: every round reports how long drafting, verification and the rest took. The policy keeps
  running ratios of measured to predicted time — for a draft step, for verification at each γ tried
  (others take the average), for a plain step (or, until one is measured, verification's) — and the
  measured bookkeeping time as R. The cost model's shape (how costs scale with batch, context and γ)
  is kept; its level is corrected to what this machine does now.
- While γ = 0 is chosen nothing is learned about drafting, so a one-token probe round runs every
  `probe_every` plain steps. Conversely, while speculating nothing is learned about a plain step, the
  baseline every choice is weighed against: the first round is a plain step, and one more runs every
  `plain_every` speculative rounds, so a cost model that flatters speculation is caught by the clock.
"""

from __future__ import annotations

from magicdec.costmodel import CostModel, omega
from magicdec.engine.state import BatchState

ALPHA_PRIOR = 0.8  # StreamingLLM-512 self-speculation accepts 0.79-0.84 on PG-19 (MagicDec, Llama-3.1-8B)
PRIOR_TRIALS = 16.0  # the prior weighs as much as 16 observed draft positions
FORGET = 0.9  # per round: an estimate follows the text within ~10 rounds
RATIO_FORGET = 0.7  # measured/predicted time ratios: follow the machine within a few rounds
PROBE_EVERY = 16
PLAIN_EVERY = 32


class AlphaEstimate:
    def __init__(self, prior: float = ALPHA_PRIOR, weight: float = PRIOR_TRIALS, forget: float = FORGET) -> None:
        self.accepted, self.trials, self.forget = prior * weight, weight, forget

    @property
    def value(self) -> float:
        return min(max(self.accepted / self.trials, 0.0), 0.999)

    def update(self, gamma: int, accepted: list[int]) -> None:
        self.accepted = self.forget * self.accepted + sum(accepted)
        self.trials = self.forget * self.trials + sum(min(k + 1, gamma) for k in accepted)


class Calibration:
    """Running ratios of measured to predicted seconds, by kind of step."""

    def __init__(self, forget: float = RATIO_FORGET) -> None:
        self.forget, self.ratios = forget, {}

    def update(self, key: object, measured: float, predicted: float) -> None:
        if measured > 0 and predicted > 0:
            old = self.ratios.get(key)
            r = measured / predicted
            self.ratios[key] = r if old is None else self.forget * old + (1 - self.forget) * r

    def get(self, key: object, default: float | None = None) -> float | None:
        return self.ratios.get(key, default)


class AutoGamma:
    """A `GammaPolicy` driven by a `CostModel`, calibrated by the run's own step times."""

    def __init__(self, cost: CostModel, max_gamma: int, alpha: AlphaEstimate | None = None,
                 probe_every: int = PROBE_EVERY, plain_every: int = PLAIN_EVERY) -> None:
        self.cost, self.max_gamma = cost, max_gamma
        self.alpha = alpha or AlphaEstimate()
        self.calibration = Calibration()
        self.overhead: float | None = None  # measured seconds per round beyond drafting and verifying
        self.probe_every, self._plain_steps = probe_every, 0
        self.plain_every, self._spec_rounds = plain_every, 0
        self.predicted: list[float] = []  # the speedup expected of each choice, for diagnostics
        self._step: tuple[int, list[int]] | None = None

    def _verify_ratio(self, gamma: int) -> float:
        seen = [v for k, v in self.calibration.ratios.items() if isinstance(k, int)]
        return self.calibration.get(gamma, sum(seen) / len(seen) if seen else 1.0)

    def choose(self, state: BatchState) -> int:
        contexts = state.contexts()
        batch = len(contexts)
        cal = self.calibration
        t_target = self.cost.t_target(batch, contexts) * cal.get("target", self._verify_ratio(1))
        t_draft = self.cost.t_draft(batch, contexts) * cal.get("draft", 1.0)
        overhead = self.overhead if self.overhead is not None else self.cost.hardware.round_overhead_s
        alpha = self.alpha.value
        gamma, best = 0, 1.0
        for g in range(1, self.max_gamma + 1):
            t_verify = self.cost.t_verify(batch, contexts, g) * self._verify_ratio(g)
            speedup = omega(g, alpha) * t_target / (g * t_draft + t_verify + overhead)
            if speedup > best:
                gamma, best = g, speedup
        if gamma == 0:
            self._plain_steps += 1
            if self._plain_steps % self.probe_every == 0:
                gamma = 1
        elif "target" not in cal.ratios:
            gamma = 0  # measure the baseline first
        else:
            self._spec_rounds += 1
            if self._spec_rounds % self.plain_every == 0:
                gamma = 0  # and again now and then
        self.predicted.append(best)
        self._step = (batch, contexts)
        return gamma

    def observe(self, gamma: int, accepted: list[int], seconds: tuple[float, float, float]) -> None:
        """After a round: accepted counts, and (draft, verify, rest) seconds; a plain step reports
        (0, step, 0)."""
        if self._step is None:
            return
        batch, contexts = self._step
        draft_s, verify_s, rest_s = seconds
        if gamma == 0:
            self.calibration.update("target", verify_s, self.cost.t_target(batch, contexts))
            return
        self.alpha.update(gamma, accepted)
        self.calibration.update("draft", draft_s / gamma, self.cost.t_draft(batch, contexts))
        self.calibration.update(gamma, verify_s, self.cost.t_verify(batch, contexts, gamma))
        f = RATIO_FORGET
        self.overhead = rest_s if self.overhead is None else f * self.overhead + (1 - f) * rest_s
