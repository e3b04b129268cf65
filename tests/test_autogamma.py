"""--gamma auto: the policy follows the cost model, the acceptance it observes, and the step times it
measures."""

from __future__ import annotations

import pytest

from magicdec.bench.policy_sim import StepTimes, compare, model_scale
from magicdec.costmodel import BUILTIN_PROFILES, CostModel, DraftSpec, resolve_model
from magicdec.costmodel.policy import CLIMB, AlphaEstimate, AutoGamma, BatchView, StepReport


def batch_at(context: int, batch: int, remaining: int = 1 << 20) -> BatchView:
    return BatchView([context] * batch, [remaining] * batch)


def report(gamma: int, accepted: list[int], seconds: tuple[float, float, float]) -> StepReport:
    """A step's report with (draft, verify, other) seconds, every request at `gamma` (a plain step: none drafted,
    its time the verify time)."""
    rows = [f"r{i}" for i in range(len(accepted))]
    return StepReport(rows, [gamma] * len(rows), accepted, draft_s=seconds[0], verify_s=seconds[1],
                      other_s=seconds[2])


def policy(context: int, batch: int, alpha: float = 0.8, plain_ratio: float = 1.0) -> tuple[AutoGamma, BatchView]:
    """A policy past its first round, a plain step measured `plain_ratio` times the model's T_T."""
    cost = CostModel(resolve_model("llama-3.1-8b"), BUILTIN_PROFILES["h100"], DraftSpec("self", 512))
    auto, state = AutoGamma(cost, 8, AlphaEstimate(prior=alpha)), batch_at(context, batch)
    assert auto.choose(state) == 0  # the baseline is measured first
    auto.observe(report(0, [], (0.0, plain_ratio * cost.t_target(batch, state.contexts), 0.0)))
    return auto, state


def test_speculates_where_the_kv_cache_dominates_and_not_where_it_does_not() -> None:
    long_ctx, state = policy(32768, 32)
    assert long_ctx.choose(state) >= 2
    short, state = policy(256, 1, alpha=0.3)
    assert short.choose(state) == 0  # drafting reads all the weights again: not worth it at α = 0.3


def test_low_acceptance_lowers_gamma() -> None:
    auto, state = policy(32768, 32)
    first = auto.choose(state)
    for _ in range(30):
        auto.observe(report(first, [0] * 32, (0.0, 0.0, 0.0)))  # every first draft rejected
        g = auto.choose(state)
        first = g or 1
    assert auto.alpha.value < 0.2 and auto.choose(state) <= 1


def test_measured_costs_override_the_model() -> None:
    auto, state = policy(32768, 32)
    g = auto.choose(state)
    assert g >= 2
    b, ctx = 32, state.contexts
    # this machine drafts 5x slower than the model predicts (acceptance stays at 0.8)
    for _ in range(10):
        accepted = [min(i % 5, g) for i in range(32)]  # 0, 1, 2, 3, 4 accepted: α ≈ 0.7
        auto.observe(report(g, accepted, (5 * g * auto.cost.t_draft(b, ctx), auto.cost.t_verify(b, ctx, g), 0.0)))
        g = auto.choose(state) or 1
    assert auto.calibration.get("draft") > 4 and auto.choose(state) <= 1


def test_a_plain_step_slower_than_predicted_keeps_speculating_and_a_faster_one_stops_it() -> None:
    """The measured plain step is the baseline: if plain decoding runs 5x faster than the model says
    while drafting and verification run as predicted, speculation no longer pays."""
    slow, state = policy(32768, 32, plain_ratio=1.5)
    assert slow.choose(state) >= 2
    fast, state = policy(32768, 32, plain_ratio=0.2)
    b, ctx = 32, state.contexts
    g = 2  # a round as the model predicts it
    fast.observe(report(g, [2] * 32, (g * fast.cost.t_draft(b, ctx), fast.cost.t_verify(b, ctx, g), 0.0)))
    assert fast.choose(state) == 0


def test_plain_steps_are_remeasured_while_speculating() -> None:
    auto, state = policy(32768, 32)
    b, ctx = 32, state.contexts
    history = []
    for _ in range(2 * auto.plain_every + 2):
        g = auto.choose(state)
        history.append(g)
        if g:
            auto.observe(report(g, [g] * 32, (g * auto.cost.t_draft(b, ctx), auto.cost.t_verify(b, ctx, g), 0.0)))
        else:
            auto.observe(report(0, [], (0.0, auto.cost.t_target(b, ctx), 0.0)))
    assert history.count(0) == 2 and all(g >= 2 for g in history if g)


# Simulated machines whose step times differ from the cost model the policy plans with (plain steps faster,
# drafts slower, verification growing faster with γ), decoding 64 tokens per sequence with noisy, drifting
# step times: the policy must land within 5% of the best fixed γ (0 = plain) in mean throughput.
SCENARIOS = [  # model, profile, batch, context, α
    ("llama-3.1-8b", "h100", 32, 32768, 0.8),  # long context, large batch: speculation pays well
    ("llama-3.1-8b", "h100", 64, 4096, 0.8),  # the paper's case where self-speculation loses
    ("smollm2-135m", "cpu", 1, 2048, 0.95),  # weight-bound: drafting costs nearly a full step
    ("smollm2-135m", "cpu", 8, 2048, 0.6),  # low acceptance: plain decoding is best
    ("smollm2-135m", "cpu", 8, 6144, 0.9),
]


@pytest.mark.parametrize(("model", "hardware", "batch", "context", "alpha"), SCENARIOS)
def test_auto_is_within_5_percent_of_the_best_fixed_gamma_in_simulation(
        model: str, hardware: str, batch: int, context: int, alpha: float) -> None:
    cost = CostModel(resolve_model(model), BUILTIN_PROFILES[hardware], DraftSpec("self", 512))
    ctx = [context] * batch
    truth = StepTimes(target=0.8 * cost.t_target(batch, ctx), draft=1.3 * cost.t_draft(batch, ctx),
                      verify={g: (1 + 0.08 * g) * cost.t_verify(batch, ctx, g) for g in range(1, 9)},
                      round=0.02 * cost.t_target(batch, ctx))
    tps = compare(lambda: AutoGamma(cost, 8), truth, batch, context, 64, alpha, range(0, 7),
                  runs=30, scale=model_scale(cost, batch, context))
    best = max(v for k, v in tps.items() if k != "auto")
    assert tps["auto"] >= 0.95 * best, {k: round(v / tps["0"], 3) for k, v in tps.items()}


def test_gamma_never_drafts_past_the_tokens_still_needed() -> None:
    auto, state = policy(32768, 32)
    assert auto.choose(batch_at(32768, 32, remaining=2)) == 1  # 2 tokens to go: at most 1 draft
    assert auto.choose(batch_at(32768, 32, remaining=1)) == 0


def test_gamma_climbs_step_by_step_to_what_it_has_timed() -> None:
    auto, state = policy(131072, 32, alpha=0.95)  # the model alone would draft 8 at once
    b, ctx = 32, state.contexts
    chosen = []
    for _ in range(6):
        g = auto.choose(state)
        chosen.append(g)
        auto.observe(report(g, [g] * 32, (g * auto.cost.t_draft(b, ctx), auto.cost.t_verify(b, ctx, g), 0.0)))
    assert chosen[0] <= CLIMB and all(b - a <= CLIMB for a, b in zip(chosen, chosen[1:]))
    assert chosen[-1] > chosen[0]


def test_request_gamma_verifies_only_the_positions_that_pay() -> None:
    """Per request: draft position j is verified when α_i^j ≥ the cost of a verified token (in plain tokens);
    one request accepting everything does not starve the others (their α is their own)."""
    from types import SimpleNamespace

    from magicdec.costmodel.policy import RequestGamma
    from magicdec.engine.request import RequestSpec

    class Batch:
        def __init__(self) -> None:
            self.seen: list[StepReport] = []

        def choose(self, view: object) -> int:
            return 3

        def token_threshold(self, gamma: int) -> float:
            return 0.3

        def observe(self, report: StepReport) -> None:
            self.seen.append(report)

        def stats(self) -> dict:
            return {}

    def req(rid: str, gamma: int | None = None, remaining: int = 100) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, spec=RequestSpec(gamma), context=1000, remaining=remaining)

    batch = Batch()
    policy = RequestGamma(batch)
    rs = [req("good"), req("poor"), req("fixed", 2), req("ending", remaining=2)]
    assert policy.choose(rs) == [3, 3, 2, 1]  # no measurements yet: γ*; overrides; never past the end
    for _ in range(30):  # "good" accepts everything, "poor" nothing after its first position half the time
        policy.observe(StepReport(request_ids=["good", "poor"], gammas=[3, 3], accepted=[3, 0], new_tokens=5,
                                  seconds=0.1, draft_s=0.05, verify_s=0.04, other_s=0.01))
    good, poor = policy.choose(rs[:2])
    assert good == 3 and poor == 0  # α_poor ≈ 0: its first position (≈ α) is below the threshold 0.3
    assert batch.seen[-1].gammas == [3, 3] and batch.seen[-1].accepted == [3, 0]  # the batch sees every row


def test_rounds_of_model_free_drafts_calibrate_at_their_padded_width_and_open_the_model_draft() -> None:
    """Under hybrid drafting every round may carry some rows' model-free proposals, so no round is a plain
    step: the policy must still learn the machine from those rounds (else it never lets the model draft in).
    The verification is padded to its widest row: a round of widths 2 and 0 calibrates γ 2."""
    cost = CostModel(resolve_model("llama-3.1-8b"), BUILTIN_PROFILES["h100"], DraftSpec("self", 512))
    auto, state = AutoGamma(cost, 8, AlphaEstimate(prior=0.8)), batch_at(32768, 32)
    assert auto.choose(state) == 0  # nothing measured yet
    widths = [2, 0] * 16  # half the rows verify a 2-token proposal, half a plain step
    predicted = cost.t_verify(32, state.contexts, 2)
    auto.observe(StepReport([f"r{i}" for i in range(32)], widths, [0] * 32, verify_s=1.5 * predicted,
                            sources=["suffix" if w else "" for w in widths]))
    assert auto.calibration.get(2) == pytest.approx(1.5) and auto.calibration.get("target") is None
    assert auto.choose(state) >= 1  # the round measured the machine: the model draft may run


def test_verification_past_the_widest_measured_grows_as_measured_not_as_modelled() -> None:
    """Where the model overstates how verification time grows with the width (compute-bound here: 256 × 512),
    a width past the widest measured is priced by extending the measured times linearly, never above the
    model's own (calibrated) prediction; measured widths keep their calibrated times."""
    cost = CostModel(resolve_model("llama-3.1-8b"), BUILTIN_PROFILES["h100"], DraftSpec("self", 512))
    auto, state = AutoGamma(cost, 8, AlphaEstimate(prior=0.8)), batch_at(512, 256)
    rows, ctx = 256, state.contexts
    tt = cost.t_target(rows, ctx)
    measured = {0: tt, 1: 1.1 * tt, 2: 1.2 * tt}  # flatter than the model's 1.35, 1.74
    for g, t in measured.items():
        auto.choose(state)
        widths = [g] * rows
        auto.observe(StepReport([f"r{i}" for i in range(rows)], widths, [0] * rows, verify_s=t,
                                sources=["suffix" if g else "" for _ in widths]))
    _, _, verify = auto.costs(rows, ctx)
    assert verify(0) == pytest.approx(tt) and verify(2) == pytest.approx(1.2 * tt)
    assert verify(6) == pytest.approx(1.6 * tt)  # 1.2 + 4 × 0.1
    assert verify(6) < cost.t_verify(rows, ctx, 6) * auto.calibration.get(2)
    # where the model's own prediction is the lower, it stands
    auto.calibration.ratios[1], auto.calibration.ratios[2] = 0.001, 0.01  # measured: steeper than the model
    _, _, verify = auto.costs(rows, ctx)
    assert verify(6) == pytest.approx(cost.t_verify(rows, ctx, 6) * 0.01)
