"""Fit a hardware profile to measured step times (what `magicdec profile` calls after measuring).

A measurement is a record ``{"kind", "batch", "context", "gamma", "seconds"}`` whose kind is
``"target"`` (one decode step), ``"verify"`` (one verification of γ+1 tokens), ``"draft"`` (one draft
step) or ``"round"`` (a whole speculation round: γ draft steps, a verification and the bookkeeping).
The model counts each step's bytes and FLOPs (per operation) for the given target and drafter. The
fitted parameters are the effective bandwidth, the effective FLOP/s (of the measured dtype) and the
fixed overheads, so that for each forward step

    seconds ≈ Σ_ops max(bytes/bandwidth, flops/flop_s) + communication + step_overhead
              + n_layers · layer_overhead,

and a round adds `round_overhead` to its steps. The max() makes this piecewise linear: the fit
alternates between classifying every operation as memory- or compute-bound under the current
parameters and solving the resulting linear least-squares problem (relative errors, so short and
long steps weigh alike), from a few starting points, keeping the best. Parameters the measurements
cannot identify keep the base profile's value: FLOP/s when no operation is ever compute-bound, the
round overhead without "round" records, and the split between per-step and per-layer overhead
when every measured step has the same number of layers (their sum is fitted and divided in the base
profile's proportion). Communication is not fitted (it is taken from the base profile).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from magicdec.config import ModelConfig
from magicdec.costmodel.hardware import HardwareProfile, dtype_for_bytes
from magicdec.costmodel.steps import CostModel, DraftSpec, StepCost, comm_time, step_time

KINDS = ("target", "verify", "draft", "round")
# Starting points for the alternating fit, as multipliers of the base profile's FLOP/s: the fit is
# piecewise linear, and a start far on the compute-bound side can reach a different optimum.
_FLOPS_STARTS = (1.0, 0.1, 10.0)
_MAX_ITERATIONS = 50
_PARAMS = ("bw", "flops", "step", "layer", "round")

Terms = tuple[tuple[tuple[StepCost, int], ...], bool]  # (steps with multiplicities, is a round)


def measurement_terms(model: CostModel, m: Mapping[str, Any]) -> Terms:
    """The forward steps (with multiplicity) a measurement consists of, and whether it is a round."""
    kind = m.get("kind")
    if kind not in KINDS:
        raise ValueError(f"measurement kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not float(m.get("seconds", 0)) > 0:
        raise ValueError(f"measurement needs positive 'seconds': {dict(m)}")
    batch, ctx, gamma = int(m["batch"]), m["context"], int(m.get("gamma", 0))
    if kind == "target":
        return ((model.target_cost(batch, ctx), 1),), False
    if kind == "verify":
        return ((model.target_cost(batch, ctx, gamma + 1), 1),), False
    if kind == "draft":
        return ((model.draft_cost(batch, ctx), 1),), False
    if gamma < 1:
        raise ValueError(f"a 'round' measurement needs gamma >= 1: {dict(m)}")
    return ((model.draft_cost(batch, ctx), gamma), (model.target_cost(batch, ctx, gamma + 1), 1)), True


def predict(terms: Terms, profile: HardwareProfile, dtype_bytes: int) -> float:
    steps, is_round = terms
    t = sum(k * step_time(c, profile, dtype_bytes) for c, k in steps)
    return t + (profile.round_overhead_s if is_round else 0.0)


def _columns(terms: Terms, inv_bw: float, inv_flops: float) -> dict[str, float]:
    """Coefficients of each parameter in the measurement's time, given the current op classes."""
    col = dict.fromkeys(_PARAMS, 0.0)
    steps, is_round = terms
    for cost, k in steps:
        for op in cost.ops:
            if op.bytes * inv_bw >= op.flops * inv_flops:
                col["bw"] += k * op.bytes
            else:
                col["flops"] += k * op.flops
        col["step"] += k
        col["layer"] += k * cost.n_layers
    col["round"] = 1.0 if is_round else 0.0
    return col


def _lstsq(rows: list[list[float]], ys: list[float], ws: list[float]) -> list[float]:
    import numpy as np  # the fit is off the hot path; keep numpy out of the cost model's import

    a = np.asarray(rows) * np.asarray(ws)[:, None]
    b = np.asarray(ys) * np.asarray(ws)
    return [float(x) for x in np.linalg.lstsq(a, b, rcond=None)[0]]


def _solve(terms: list[Terms], ys: list[float], ws: list[float], start: dict[str, float],
           fit_layers: bool) -> dict[str, float]:
    """One linear solve for the parameters given the op classes under `start`."""
    cols = [_columns(t, start["bw"], start["flops"]) for t in terms]
    active = [k for k in ("bw", "flops", "step", "round") if any(c[k] for c in cols)]
    if fit_layers:
        active.append("layer")
    values = dict(start)
    while active:
        rows = [[c[k] for k in active] for c in cols]
        fixed = [sum(values[k] * c[k] for k in _PARAMS if k not in active) for c in cols]
        rhs = [y - f for y, f in zip(ys, fixed, strict=True)]
        sol = dict(zip(active, _lstsq(rows, rhs, ws), strict=True))
        bad = [k for k, x in sol.items() if x < 0 or (x == 0 and k in ("bw", "flops"))]
        if not bad:
            values.update(sol)
            break
        # An overhead pinned at 0, or a rate the data cannot pin down kept at its current value.
        k = next((k for k in bad if k not in ("bw", "flops")), bad[0])
        active.remove(k)
        if k not in ("bw", "flops"):
            values[k] = 0.0
    return values


def fit_profile(measurements: Sequence[Mapping[str, Any]], base: HardwareProfile, *, target: ModelConfig,
                draft: DraftSpec | None = None, dtype_bytes: int = 2, tp: int = 1, name: str | None = None,
                source: str | None = None) -> HardwareProfile:
    """A profile whose effective bandwidth, FLOP/s and overheads best explain `measurements`."""
    if len(measurements) < 3:
        raise ValueError(f"need at least 3 measurements to fit a profile, got {len(measurements)}")
    model = CostModel(target, base, draft or DraftSpec("self"), dtype_bytes, tp)
    terms = [measurement_terms(model, m) for m in measurements]
    secs = [float(m["seconds"]) for m in measurements]
    ys = [s - sum(k * comm_time(c, base) for c, k in t[0]) for s, t in zip(secs, terms, strict=True)]
    ws = [1.0 / s for s in secs]
    layer_counts = {c.n_layers for t in terms for c, _ in t[0]}
    fit_layers = len(layer_counts) > 1
    inv_bw0, inv_flops0 = 1.0 / base.effective_bandwidth, 1.0 / base.effective_flops(dtype_bytes)

    best: tuple[float, HardwareProfile] | None = None
    for mult in _FLOPS_STARTS:
        params = {"bw": inv_bw0, "flops": inv_flops0 / mult, "step": base.step_overhead_s,
                  "layer": base.layer_overhead_s if fit_layers else 0.0, "round": base.round_overhead_s}
        for _ in range(_MAX_ITERATIONS):
            new = _solve(terms, ys, ws, params, fit_layers)
            done = all(math.isclose(new[k], params[k], rel_tol=1e-9, abs_tol=1e-15) for k in _PARAMS)
            params = new
            if done:
                break
        prof = _profile(base, params, dtype_bytes, None if fit_layers else min(layer_counts), name, source)
        err = sum((predict(t, prof, dtype_bytes) / s - 1) ** 2 for t, s in zip(terms, secs, strict=True))
        if best is None or err < best[0]:
            best = (err, prof)
    assert best is not None
    return best[1]


def _profile(base: HardwareProfile, params: dict[str, float], dtype_bytes: int, layers: int | None,
             name: str | None, source: str | None) -> HardwareProfile:
    inv_bw, inv_flops, step, layer = params["bw"], params["flops"], params["step"], params["layer"]
    if layers is not None:  # one layer count: only step + layers·layer is known; split it like base
        step += layers * layer
        total_base = base.step_overhead_s + layers * base.layer_overhead_s
        share = base.step_overhead_s / total_base if total_base > 0 else 1.0
        step, layer = step * share, step * (1.0 - share) / layers
    scale = (1.0 / inv_flops) / base.effective_flops(dtype_bytes)
    flops = {dt: base.peak_flops(dt) * base.flops_efficiency * scale for dt in ("bf16", "fp16", "fp32")}
    label = name or base.name
    return base.with_(
        name=label, mem_bandwidth=1.0 / inv_bw, flops_bf16=flops["bf16"], flops_fp16=flops["fp16"],
        flops_fp32=flops["fp32"], interconnect_bandwidth=base.effective_interconnect, step_overhead_s=step,
        layer_overhead_s=layer, round_overhead_s=params["round"], bandwidth_efficiency=1.0,
        flops_efficiency=1.0, interconnect_efficiency=1.0,
        source=source or f"measured on {label} ({dtype_for_bytes(dtype_bytes)})",
    )


def relative_errors(measurements: Sequence[Mapping[str, Any]], profile: HardwareProfile, *,
                    target: ModelConfig, draft: DraftSpec | None = None, dtype_bytes: int = 2,
                    tp: int = 1) -> list[float]:
    """(predicted − measured) / measured for each measurement under `profile`."""
    model = CostModel(target, profile, draft or DraftSpec("self"), dtype_bytes, tp)
    return [predict(measurement_terms(model, m), profile, dtype_bytes) / float(m["seconds"]) - 1.0
            for m in measurements]
