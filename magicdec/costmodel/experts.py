"""Mixture-of-experts layers as the cost model sees them: how many experts a step's tokens route to, what
the experts weigh, and an optional measured routing distribution.

A MoE layer with E routed experts, each token picking k of them (top-k), reads in one step the weights of
every expert that at least one of the step's n tokens picks (n = batch for a decode or draft step,
batch·(γ+1) for a verification). If expert e is among one token's k picks with probability p_e
(Σ_e p_e = k) and different tokens pick independently, expert e is read with probability 1 − (1 − p_e)^n,
so by linearity of expectation the expected number of experts read is

    U(n) = Σ_e [1 − (1 − p_e)^n],        uniform routing (p_e = k/E):  U(n) = E·(1 − (1 − k/E)^n).

U(1) = k exactly (one token's k picks are distinct); U(n) → the number of experts with p_e > 0 as n grows.
The one approximation is the independence of different tokens: the positions of one sequence share
experts more than chance, so a real step reads about U(n) or fewer. `Routing` replaces the uniform p by a
measured one: one vector for every MoE layer, or one per MoE layer, from counts of each expert's picks.
A dense model's weight term does not depend on n; a MoE's grows with it, so T_V(γ)/T_T grows with γ.

Under tensor parallelism every GPU holds 1/tp of every expert (its intermediate columns); expert
parallelism is not modelled. Expert weights are counted at `ModelConfig.expert_weight_bits` when the
checkpoint stores them so (GPT-OSS's MXFP4: 4 bits a weight plus an 8-bit scale per 32 = 4.25 bits);
a quantized self-draft reads them at the smaller of that and its own quantization.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magicdec.config import ModelConfig


class Routing:
    """A measured routing distribution: per MoE layer (or one row for all of them) each expert's chance of
    being among one token's picks; every row sums to top-k."""

    __slots__ = ("probs", "_cache")

    def __init__(self, probs: Sequence[Sequence[float]]) -> None:
        rows = tuple(tuple(float(p) for p in row) for row in probs)
        if not rows or not all(rows) or len({len(r) for r in rows}) != 1:
            raise ValueError("routing needs one or more rows of per-expert probabilities, all of one length")
        if any(not 0.0 <= p <= 1.0 for r in rows for p in r):
            raise ValueError("routing probabilities must be in [0, 1]")
        self.probs = rows
        self._cache: dict[int, float] = {}

    @classmethod
    def from_counts(cls, counts: Sequence[float] | Sequence[Sequence[float]], top_k: int) -> Routing:
        """From how often each expert was picked (one list, or one per MoE layer): a row's counts over its
        tokens (their sum / top_k) give each expert's chance of being among a token's picks."""
        nested = bool(counts) and isinstance(counts[0], Sequence)
        rows = [[float(c) for c in row] for row in (counts if nested else [counts])]  # type: ignore[union-attr]
        out = []
        for row in rows:
            total = sum(row)
            if top_k < 1 or total <= 0 or min(row) < 0:
                raise ValueError("routing counts must be non-negative with a positive sum, and top_k >= 1")
            out.append([min(1.0, top_k * c / total) for c in row])
        return cls(out)

    @property
    def n_experts(self) -> int:
        return len(self.probs[0])

    def expected_experts(self, n_tokens: int, row: int | None = None) -> float:
        """Expected distinct experts n tokens pick in one MoE layer: that of row `row`, or the mean over rows."""
        if row is not None:
            return _distinct(self.probs[row % len(self.probs)], n_tokens)
        if n_tokens not in self._cache:
            self._cache[n_tokens] = sum(_distinct(r, n_tokens) for r in self.probs) / len(self.probs)
        return self._cache[n_tokens]

    def check(self, model: ModelConfig) -> None:
        n_moe = moe_layer_count(model)
        if not n_moe:
            raise ValueError(f"a routing distribution was given for {model.name or 'a model'} without experts")
        if self.n_experts != model.n_experts:
            raise ValueError(f"routing lists {self.n_experts} experts, the model has {model.n_experts}")
        if len(self.probs) not in (1, n_moe):
            raise ValueError(f"routing has {len(self.probs)} rows; give one, or one per MoE layer ({n_moe})")

    def to_dict(self) -> dict[str, Any]:
        return {"probs": [list(r) for r in self.probs]}


def load_routing(path: str | Path, top_k: int) -> Routing:
    """A routing distribution from JSON: ``{"probs": [[...], ...]}`` (rows summing to top-k), or
    ``{"counts": [...] | [[...], ...]}`` (how often each expert was picked, per MoE layer or overall)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "probs" in data:
        return Routing(data["probs"])
    if isinstance(data, dict) and "counts" in data:
        return Routing.from_counts(data["counts"], top_k)
    raise ValueError(f"{path}: a routing file holds {{'probs': ...}} or {{'counts': ...}}")


def _distinct(probs: Sequence[float], n: int) -> float:
    return sum(1.0 - (1.0 - p) ** n for p in probs)


def moe_layer_count(model: ModelConfig) -> int:
    """Layers whose MLP is a mixture of experts (0 for a dense model)."""
    if not model.n_experts:
        return 0
    return sum(1 for i in range(model.n_layers) if model.is_moe_layer(i))


def expected_active_experts(model: ModelConfig, n_tokens: int, routing: Routing | None = None,
                            layer: int | None = None) -> float:
    """Expected distinct routed experts that `n_tokens` tokens of one step read in a MoE layer — the mean over
    the MoE layers, or the `layer`-th MoE layer's (0 for a dense model). Uniform routing unless `routing`."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if not model.n_experts or n_tokens == 0:
        return 0.0
    if routing is not None:
        return routing.expected_experts(n_tokens, layer)
    e, k = model.n_experts, model.n_experts_per_token
    return e * -math.expm1(n_tokens * math.log1p(-k / e)) if k < e else float(e)


def expert_size(model: ModelConfig) -> int:
    """A routed expert's hidden size."""
    return model.moe_intermediate_size or model.intermediate_size


def expert_weight_bytes(model: ModelConfig, weight_bytes: float) -> float:
    """Bytes per routed-expert weight: as stored (`expert_weight_bits`), never more than the other linear
    layers' `weight_bytes` (a quantized self-draft keeps experts already stored smaller)."""
    stored = model.expert_weight_bits / 8
    return min(weight_bytes, stored) if stored else weight_bytes


def active_parameters(model: ModelConfig) -> float:
    """Parameters one token computes with: the dense ones, the router, the shared expert and k routed experts."""
    if not model.n_experts:
        return model.num_parameters()
    d, n_moe = model.hidden_size, moe_layer_count(model)
    per_moe = d * model.n_experts + 3 * d * (model.n_experts_per_token * expert_size(model)
                                             + model.shared_expert_intermediate_size)
    return _dense_without_moe_mlps(model) + n_moe * per_moe


def stored_weight_bytes(model: ModelConfig, dtype_bytes: int) -> float:
    """Bytes of every weight as stored on the device: for a MoE every expert, at `expert_weight_bits` if set."""
    if not model.n_experts:
        return model.weight_bytes(dtype_bytes)
    d, n_moe = model.hidden_size, moe_layer_count(model)
    routed = model.n_experts * 3 * d * expert_size(model) * expert_weight_bytes(model, dtype_bytes)
    other = dtype_bytes * (d * model.n_experts + 3 * d * model.shared_expert_intermediate_size)
    return dtype_bytes * _dense_without_moe_mlps(model) + n_moe * (routed + other)


def linear_weights(model: ModelConfig) -> tuple[float, float]:
    """Weights of the linear layers a quantized self-draft copies (q/k/v/o, MLPs, shared experts and the LM
    head, tied or not): (those outside the routed experts, those of the routed experts)."""
    d, L, n_moe = model.hidden_size, model.n_layers, moe_layer_count(model)
    attention = d * (model.q_size + 2 * model.kv_size) + model.q_size * d
    mlps = (L - n_moe) * 3 * d * model.intermediate_size + n_moe * 3 * d * model.shared_expert_intermediate_size
    routed = n_moe * model.n_experts * 3 * d * expert_size(model)
    return float(L * attention + mlps + model.vocab_size * d), float(routed)


def _dense_without_moe_mlps(model: ModelConfig) -> float:
    """Parameters of the model's dense shape less the MLPs of its MoE layers."""
    dense = model.with_(n_experts=0, n_experts_per_token=0).num_parameters()
    return dense - moe_layer_count(model) * 3 * model.hidden_size * model.intermediate_size
