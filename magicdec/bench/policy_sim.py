"""Replaying a γ policy against given step times: what `--gamma auto` costs next to each fixed γ, free of
the noise of any one machine run.

A simulated batch decodes `new_tokens` per sequence, shrinking as sequences finish. Each round asks the
policy for γ, charges the given step times (with per-step noise and a slow drift of the machine's speed,
both multiplicative and log-normal), draws each sequence's accepted drafts from its own acceptance rate
(every draft position accepted with probability α until the first rejection), and reports the round to
the policy exactly as the engine does. Used by tests/test_autogamma.py and benchmarks/autogamma_sim.py.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from magicdec.costmodel import CostModel
from magicdec.costmodel.policy import BatchView, FixedGamma, GammaPolicy, StepReport

Scale = Callable[[list[int]], float]  # live contexts → factor on the full batch's step times


def model_scale(cost: CostModel, batch: int, context: int) -> Scale:
    """Step times follow the cost model's plain step as the batch shrinks and its contexts grow."""
    full = cost.t_target(batch, [context] * batch)
    return lambda live: cost.t_target(len(live), live) / full


@dataclass(frozen=True, slots=True)
class StepTimes:
    """Seconds of one plain step, one draft step, one verification of γ+1 tokens (by γ; beyond the largest
    given, extrapolated linearly from the last two) and the bookkeeping of a speculation round."""

    target: float
    draft: float
    verify: dict[int, float]
    round: float = 0.0

    def verify_at(self, gamma: int) -> float:
        if gamma in self.verify:
            return self.verify[gamma]
        known = sorted(self.verify)
        hi, lo = known[-1], known[-2] if len(known) > 1 else None
        slope = (self.verify[hi] - self.verify[lo]) / (hi - lo) if lo is not None else self.verify[hi] / (hi + 1)
        return self.verify[hi] + slope * (gamma - hi)


@dataclass(frozen=True, slots=True)
class Noise:
    step: float = 0.05  # log-normal σ of each step's time
    drift: float = 0.07  # stationary σ of the machine's log-speed, which drifts …
    drift_rounds: float = 20.0  # … with this correlation time, in rounds
    alpha_spread: float = 0.05  # σ of the sequences' acceptance rates around α


def simulate(policy: GammaPolicy, times: StepTimes, batch: int, context: int, new_tokens: int, alpha: float,
             rng: random.Random, noise: Noise = Noise(), scale: Scale | None = None) -> float:
    """Seconds the policy takes to bring every sequence to `new_tokens` tokens (the first from prefill).
    `scale(contexts)`: the factor on step times once the batch has shrunk to these live contexts."""
    generated = [1] * batch  # the first token is prefill's
    alphas = [min(0.999, max(0.0, rng.gauss(alpha, noise.alpha_spread))) for _ in range(batch)]
    decay = math.exp(-1.0 / noise.drift_rounds)
    level, clock = rng.gauss(0.0, noise.drift), 0.0
    while live := [i for i, n in enumerate(generated) if n < new_tokens]:
        view = BatchView([context + generated[i] - 1 for i in live], [new_tokens - generated[i] for i in live])
        gamma = policy.choose(view)
        level = decay * level + rng.gauss(0.0, noise.drift * math.sqrt(1 - decay * decay))
        factor = scale(view.contexts) if scale else 1.0
        if gamma == 0:
            step = _noisy(factor * times.target, level, noise, rng)
            clock += step
            policy.observe(StepReport([str(i) for i in live], [0] * len(live), [0] * len(live), verify_s=step))
            gained = [1] * len(live)
        else:
            draft, verify, rest = (_noisy(factor * t, level, noise, rng) for t in
                                   (gamma * times.draft, times.verify_at(gamma), times.round))
            clock += draft + verify + rest
            accepted = [_accepted(alphas[i], gamma, rng) for i in live]
            policy.observe(StepReport([str(i) for i in live], [gamma] * len(live), accepted, draft_s=draft,
                                      verify_s=verify, other_s=rest))
            gained = [k + 1 for k in accepted]
        for i, n in zip(live, gained):
            generated[i] = min(generated[i] + n, new_tokens)
    return clock


def _noisy(seconds: float, level: float, noise: Noise, rng: random.Random) -> float:
    return seconds * math.exp(level + rng.gauss(0.0, noise.step))


def _accepted(alpha: float, gamma: int, rng: random.Random) -> int:
    k = 0
    while k < gamma and rng.random() < alpha:
        k += 1
    return k


def compare(make_auto: Callable[[], GammaPolicy], times: StepTimes, batch: int, context: int, new_tokens: int,
            alpha: float, gammas: range, runs: int = 50, noise: Noise = Noise(), scale: Scale | None = None,
            seed: int = 0) -> dict[str, float]:
    """Mean throughput (tokens/s) of "auto" and of each fixed γ in `gammas` (0 = plain) over `runs` seeds."""
    policies: dict[str, Callable[[], GammaPolicy]] = {f"{g}": (lambda g=g: FixedGamma(g)) for g in gammas}
    policies["auto"] = make_auto
    out = {}
    for name, make in policies.items():
        seconds = [simulate(make(), times, batch, context, new_tokens, alpha, random.Random(seed + r), noise, scale)
                   for r in range(runs)]
        out[name] = batch * new_tokens / statistics.mean(seconds)
    return out
