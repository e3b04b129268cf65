"""γ policies: how many tokens to draft each round. A policy sees the batch (`BatchView`) before a
step and the step's report (`StepReport`, which the engine core returns) after it; it never reaches into
the engine.

`FixedGamma` always answers the same γ. `AutoGamma` (`--gamma auto`) chooses γ every round from the
cost model, a running estimate of α, and the step times this run actually measures.

Each round the policy asks the cost model for T_T, T_D and T_V(γ) of the batch as it is now — its size
and every sequence's current context — and picks the γ (0 = a plain decoding step) that maximises
Eq. 1's speedup Ω(γ, α)·T_T / (γ·T_D + T_V(γ) + R) at the acceptance rate estimated so far.

- α: per sequence and round, the draft positions tried (up to and including the first rejection) and
  those accepted, older rounds forgotten geometrically, from a prior worth a few draft positions.
- Calibration: every round reports how long drafting, verification and the rest took. The policy keeps
  running ratios of measured to predicted time — for a draft step, for verification at each γ tried
  (an untried γ takes the nearest tried one's), for a plain step — and the measured bookkeeping time
  as R. Until a kind of step has been timed it takes the level of those that have. The cost model's
  shape (how costs scale with batch, context and γ) is kept; its level is corrected to what this
  machine does now.
- γ climbs at most `CLIMB` above the largest γ already timed, and never drafts past the tokens the
  batch still needs (`max_new_tokens`).
- While γ = 0 is chosen nothing is learned about drafting, so the best speculative γ runs as a probe
  round now and then: as often as keeps the probes' predicted extra time near `PROBE_SHARE` of the
  run (often when speculation is close to paying, rarely when it is far from it, at least every
  `probe_every` plain steps). Conversely, while speculating nothing is learned about a plain step, the
  baseline every choice is weighed against: the first round is a plain step, and one more runs every
  `plain_every` speculative rounds, so a cost model that flatters speculation is caught by the clock.

How much this exploring costs is measured in simulation (`magicdec.bench.policy_sim`, tests and
benchmarks/autogamma_sim.py) as well as on the machine (docs/cost-model.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from magicdec.costmodel import analysis
from magicdec.costmodel.analysis import omega
from magicdec.costmodel.steps import CostModel

ALPHA_PRIOR = 0.8  # the acceptance the MagicDec paper reports for StreamingLLM-512 self-speculation
PRIOR_TRIALS = 4.0  # the prior weighs as much as 4 observed draft positions: the text decides within rounds
FORGET = 0.9  # per round: an estimate follows the text within ~10 rounds
RATIO_FORGET = 0.7  # measured/predicted time ratios: follow the machine within a few rounds
PROBE_SHARE = 0.015  # while plain, speculative probe rounds may cost this share of the time …
PROBE_EVERY = 64  # … and one runs at least this often
PLAIN_EVERY = 32  # while speculating, one round in this many is a plain step
CLIMB = 2  # γ rises at most this far above the largest γ whose verification has been timed


@dataclass(frozen=True, slots=True)
class BatchView:
    """What a γ policy sees of a batch: each live sequence's context and the tokens it may still generate."""

    contexts: list[int]
    remaining: list[int]


@dataclass(frozen=True, slots=True)
class StepReport:
    """One engine step: per decoding request its γ (0: a plain step), accepted drafts and draft source ("self":
    the model draft; "ngram", "suffix", "suffix-global": a model-free proposal; "" for a plain step); tokens;
    where the time went (host clock; phases from CUDA events on CUDA; `capture_s`: the part of `seconds`
    spent capturing CUDA graphs of shapes met for the first time)."""

    request_ids: list[str]
    gammas: list[int]
    accepted: list[int]
    prefill_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0  # for a plain step: the step
    other_s: float = 0.0
    prefill_s: float = 0.0
    capture_s: float = 0.0
    sources: list[str] | None = None  # None: every request with γ > 0 drafted with the model

    @property
    def gamma(self) -> int:
        """The verification's width: the most draft positions any request verified (0: a plain step)."""
        return max(self.gammas, default=0)

    def _model(self, i: int) -> bool:
        return self.gammas[i] > 0 and (self.sources is None or self.sources[i] == "self")

    @property
    def draft_steps(self) -> int:
        """Forwards the model draft ran: the largest γ of the requests it drafted for."""
        return max((g for i, g in enumerate(self.gammas) if self._model(i)), default=0)

    @property
    def drafted(self) -> tuple[list[int], list[int]]:
        """The γ and the accepted drafts of the requests the model draft drafted for."""
        rows = [i for i in range(len(self.gammas)) if self._model(i)]
        return [self.gammas[i] for i in rows], [self.accepted[i] for i in rows]


class GammaPolicy(Protocol):
    def choose(self, batch: BatchView) -> int:
        """γ for the next round (0: a plain decoding step)."""
        ...

    def observe(self, report: StepReport) -> None:
        """What the round chosen last did: accepted counts and phase timings."""
        ...

    def stats(self) -> dict[str, Any]:
        """What the policy learned, for the run's statistics."""
        ...


class FixedGamma:
    """γ as asked, but never drafting past the tokens the longest-running live sequence still needs."""

    def __init__(self, gamma: int) -> None:
        self.gamma = gamma

    def choose(self, batch: BatchView) -> int:
        return min(self.gamma, max(max(batch.remaining, default=1) - 1, 0))

    def observe(self, report: StepReport) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


class AlphaEstimate:
    def __init__(self, prior: float = ALPHA_PRIOR, weight: float = PRIOR_TRIALS, forget: float = FORGET) -> None:
        self.accepted, self.trials, self.forget = prior * weight, weight, forget

    @property
    def value(self) -> float:
        return min(max(self.accepted / self.trials, 0.0), 0.999)

    def update(self, gamma: int, accepted: list[int], gammas: list[int] | None = None) -> None:
        """A round's accepted counts (`gammas`: each row's own γ, when rows drafted differently)."""
        self.accepted = self.forget * self.accepted + sum(accepted)
        self.trials = self.forget * self.trials + sum(min(k + 1, g) for k, g in zip(accepted, gammas or
                                                                                       [gamma] * len(accepted)))


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
        self._step: dict[object, float] | None = None  # the last choice's uncalibrated predictions, by kind
        self._view: tuple[int, list[int]] | None = None  # the last choice's rows and contexts

    def _verify_ratio(self, gamma: int) -> float:
        """Measured/predicted verification time at γ; an untried γ takes the nearest tried one's (the
        smaller on a tie), and before any the plain step's (the machine's level), or 1."""
        seen = {k: v for k, v in self.calibration.ratios.items() if isinstance(k, int)}
        if not seen:
            return self.calibration.get("target", 1.0)
        return seen[gamma] if gamma in seen else seen[min(seen, key=lambda k: (abs(k - gamma), k))]

    def choose(self, batch: BatchView) -> int:
        contexts = batch.contexts
        rows = len(contexts)
        cal, cost = self.calibration, self.cost
        # uncalibrated predictions for this batch, kept for `observe` (one evaluation per kind and round)
        raw: dict[object, float] = {"target": cost.t_target(rows, contexts), "draft": cost.t_draft(rows, contexts)}
        t_target = raw["target"] * cal.get("target", self._verify_ratio(1))
        t_draft = raw["draft"] * cal.get("draft", self._verify_ratio(1))
        overhead = self.overhead if self.overhead is not None else cost.hardware.round_overhead_s
        alpha = self.alpha.value
        spec_gamma, spec_best = 0, 0.0  # the best speculative γ, and its predicted speedup
        for g in range(1, self._gamma_limit(batch) + 1):
            raw[g] = cost.t_verify(rows, contexts, g)
            speedup = analysis.speedup(t_target, raw[g] * self._verify_ratio(g), t_draft, g, alpha, overhead)
            if speedup > spec_best:
                spec_gamma, spec_best = g, speedup
        gamma = spec_gamma if spec_best > 1.0 else 0
        if gamma == 0:
            self._plain_steps += 1
            if spec_gamma and self._plain_steps >= self._probe_gap(spec_best, omega(spec_gamma, alpha)):
                gamma, self._plain_steps = spec_gamma, 0
        elif not cal.ratios:
            gamma = 0  # measure the machine first (a plain step; under hybrid drafting, the round's proposals)
        else:
            self._plain_steps = 0
            self._spec_rounds += 1
            if self._spec_rounds % self.plain_every == 0:
                gamma = 0  # and again now and then
        self._step, self._view = raw, (rows, contexts)
        return gamma

    def token_threshold(self, gamma: int) -> float | None:
        """For the round chosen last at γ ≥ 1: what one more verified token of one sequence costs, in plain
        tokens of that sequence — (T_V(γ) − T_V(γ − 1)) / T_T, calibrated. A draft position whose chance of
        being accepted is below it does not pay for its verification (`RequestGamma`)."""
        raw = self._step
        if raw is None or gamma < 1 or gamma not in raw:
            return None
        t_target = raw["target"] * self.calibration.get("target", self._verify_ratio(1))
        before = raw[gamma - 1] * self._verify_ratio(gamma - 1) if gamma - 1 in raw else t_target
        return max(raw[gamma] * self._verify_ratio(gamma) - before, 0.0) / t_target

    def _probe_gap(self, predicted: float, tokens: float) -> int:
        """Plain steps between probes: a probe round expected to commit `tokens` per sequence at `predicted`
        × plain's speed costs tokens · (1/predicted − 1) plain steps more than plain decoding would, and
        probes may cost PROBE_SHARE of the time — often when speculation is close to paying, rarely when
        it is far from it."""
        return max(1, min(self.probe_every, math.ceil(tokens * (1.0 / predicted - 1.0) / PROBE_SHARE)))

    def _gamma_limit(self, batch: BatchView) -> int:
        """γ climbs at most CLIMB above the largest γ verified so far (whose time it has measured), and
        never drafts past the tokens the longest-running live sequence still needs."""
        tried = max((k for k in self.calibration.ratios if isinstance(k, int)), default=0)
        limit = min(self.max_gamma, tried + CLIMB)
        return min(limit, max(batch.remaining, default=1) - 1)

    def observe(self, report: StepReport) -> None:
        """After a round: its accepted counts and the seconds it spent drafting, verifying (a plain
        step: the step) and otherwise. Rows verify ragged widths (per-request γ, model-free drafts) in one
        forward padded to the widest, so a round calibrates T_V at its widest row's γ."""
        raw, gamma, steps = self._step, report.gamma, report.draft_steps
        if raw is None:
            return  # not a round this policy chose
        draft_s, verify_s, rest_s = report.draft_s, report.verify_s, report.other_s
        if gamma == 0:
            self.calibration.update("target", verify_s, raw["target"])
            return
        if steps:
            gammas, accepted = report.drafted
            self.alpha.update(steps, accepted, gammas)
            self.calibration.update("draft", draft_s / steps, raw["draft"])
        if gamma not in raw and self._view is not None and len(report.gammas) == self._view[0]:
            raw[gamma] = self.cost.t_verify(*self._view, gamma)  # a model-free draft wider than γ* went
        if gamma in raw:
            self.calibration.update(gamma, verify_s, raw[gamma])
        f = RATIO_FORGET
        self.overhead = rest_s if self.overhead is None else f * self.overhead + (1 - f) * rest_s

    def costs(self, rows: int, contexts: list[int]) -> tuple[float, float, Callable[[int], float]]:
        """This batch's T_T, T_D and T_V(n) in seconds, as the policy predicts them (calibrated by the steps
        it has measured). Past the widest γ measured, T_V(n) grows no faster than the measured times did up
        to it (linearly from the two widest measured), nor faster than the model says: a model that
        overstates how a wide verification's time grows would otherwise never let one be tried."""
        cal, cost = self.calibration, self.cost
        t_target = cost.t_target(rows, contexts) * cal.get("target", self._verify_ratio(1))
        t_draft = cost.t_draft(rows, contexts) * cal.get("draft", self._verify_ratio(1))
        tried = sorted(k for k in cal.ratios if isinstance(k, int))
        known: dict[int, float] = {}

        def verify(n: int) -> float:
            if n == 0:
                return t_target
            if n not in known:
                known[n] = cost.t_verify(rows, contexts, n) * self._verify_ratio(n)
                if tried and n > tried[-1]:
                    top, low = tried[-1], tried[-2] if len(tried) > 1 else 0
                    slope = max(verify(top) - verify(low), 0.0) / (top - low)
                    known[n] = min(known[n], verify(top) + (n - top) * slope)
            return known[n]

        return t_target, t_draft, verify

    def stats(self) -> dict[str, Any]:
        return {"alpha_estimate": self.alpha.value}


class RequestGamma:
    """γ per request for the serving engine (`EngineCore`'s `choose` and `observe`).

    The batch policy (`FixedGamma`, or `AutoGamma` with the cost model of the live batch: its size and
    every request's context) chooses γ* for the requests that follow the engine's setting: the draft steps
    (γ* of them) are paid by the whole batch. Each request then verifies only the draft positions that pay
    for their own verification: position j of request i is verified when its chance of acceptance α_i^j
    (α_i: the request's own measured acceptance) is at least what one more verified token costs, in plain
    tokens (`AutoGamma.token_threshold`: (T_V(γ*) − T_V(γ* − 1)) / T_T). A fixed γ applies to every request.
    A request's own setting (`RequestSpec.gamma`) overrides both, and nobody drafts past the tokens it
    still needs."""

    def __init__(self, batch: GammaPolicy) -> None:
        self.batch = batch
        self.alpha: dict[str, AlphaEstimate] = {}

    def choose(self, requests: Any) -> list[int]:
        follow = [r for r in requests if r.spec.gamma is None]
        star = self.batch.choose(BatchView([r.context for r in follow], [r.remaining for r in follow])) if follow else 0
        threshold = getattr(self.batch, "token_threshold", lambda g: None)(star)
        live = {r.request_id for r in requests}
        self.alpha = {k: v for k, v in self.alpha.items() if k in live}
        out = []
        for r in requests:
            g = star if r.spec.gamma is None else r.spec.gamma
            own = self.alpha.get(r.request_id)
            if r.spec.gamma is None and threshold is not None and own is not None:
                while g > 0 and own.value ** g < threshold:
                    g -= 1
            out.append(max(0, min(g, r.remaining - 1)))
        return out

    def observe(self, report: StepReport) -> None:
        """After a step: each request's α (from its model drafts), and the batch policy's view of the round."""
        sources = report.sources or ["self"] * len(report.gammas)
        for rid, g, k, source in zip(report.request_ids, report.gammas, report.accepted, sources):
            if g and source == "self":
                self.alpha.setdefault(rid, AlphaEstimate()).update(g, [k])
        self.batch.observe(report)

    def stats(self) -> dict[str, Any]:
        return self.batch.stats()
