"""Speculative-decoding analysis: Ω(γ, α), the speedup of paper Eq. 1, the best γ, and the critical
context length beyond which decoding stays memory-bound at any batch size.

Eq. 1: time per token with speculation over time per token without is
    (1/Ω(γ, α)) · (γ·T_D/T_T + T_V(γ)/T_T + R/T_T),
and the speedup is its inverse. R is the fixed cost of a speculation round beyond its forward
passes (acceptance, cache rollback, host synchronisation); the paper's Eq. 1 is R = 0.
γ = 0 is plain decoding (speedup 1 by definition).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from magicdec.config import ModelConfig
from magicdec.costmodel.experts import active_parameters
from magicdec.costmodel.hardware import HardwareProfile

# Below this distance from 1, α is treated as 1 (the closed form divides by 1 − α).
ALPHA_ONE_TOL = 1e-9


def omega(gamma: int, alpha: float) -> float:
    """Expected tokens committed per verification: (1 − α^(γ+1)) / (1 − α); γ + 1 when α → 1."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if 1.0 - alpha < ALPHA_ONE_TOL:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def time_ratio(t_target: float, t_verify: float, t_draft: float, gamma: int, alpha: float,
               round_overhead: float = 0.0) -> float:
    """Eq. 1: time per token with speculation over time per token without."""
    if gamma == 0:
        return 1.0
    if t_target <= 0:
        raise ValueError(f"t_target must be positive, got {t_target}")
    return (gamma * t_draft + t_verify + round_overhead) / t_target / omega(gamma, alpha)


def speedup(t_target: float, t_verify: float, t_draft: float, gamma: int, alpha: float,
            round_overhead: float = 0.0) -> float:
    """Throughput with speculation over throughput without (the inverse of `time_ratio`)."""
    return 1.0 / time_ratio(t_target, t_verify, t_draft, gamma, alpha, round_overhead)


def best_gamma(t_target: float, t_verify: Callable[[int], float], t_draft: float, alpha: float,
               max_gamma: int = 8, round_overhead: float = 0.0) -> tuple[int, float]:
    """(γ, speedup) maximising the speedup over γ in 0..max_gamma; ties go to the smaller γ."""
    if max_gamma < 0:
        raise ValueError(f"max_gamma must be >= 0, got {max_gamma}")
    best = (0, 1.0)
    for g in range(1, max_gamma + 1):
        s = speedup(t_target, t_verify(g), t_draft, g, alpha, round_overhead)
        if s > best[1]:
            best = (g, s)
    return best


def critical_context(model: ModelConfig, hardware: HardwareProfile, dtype_bytes: int = 2, tp: int = 1,
                     query_tokens: int = 1) -> float:
    """Context length beyond which a step stays memory-bound at any batch size (math.inf if never).

    Per sequence and step (per GPU), the linear layers do 2·P·q FLOPs (P = parameters a token computes with,
    q = query tokens, 1 for decoding, γ+1 for verification) and attention does 4·q·n·L·H·h FLOPs
    over 2·n·L·K·h·dtype bytes of KV (L layers, H query and K KV heads of size h). Weight bytes are
    shared by the batch, so as the batch grows the step's FLOP per byte rises towards
        I∞(n) = (2·P·q + 4·q·n·L·H·h) / (2·n·L·K·h·dtype),
    which falls with n. The step stays memory-bound at every batch while I∞(n) is below the
    machine's balance R = FLOP/s / (bytes/s); solving I∞(n) = R gives the critical n. If attention
    alone is compute-bound (2·q·g/dtype ≥ R, g = H/K) no context keeps the step memory-bound.
    """
    q, dt = query_tokens, dtype_bytes
    heads = math.ceil(model.n_heads / tp)
    kv_heads = math.ceil(model.n_kv_heads / tp)
    embedding = 0 if model.tie_word_embeddings else model.vocab_size * model.hidden_size  # gathered, not read
    p = (active_parameters(model) - embedding) / tp
    balance = hardware.effective_flops(dt) / hardware.effective_bandwidth
    # bytes per context token: of the global layers only (a sliding layer's reads stop growing at its window)
    if not model.n_global_layers:
        return math.inf
    per_token_kv = model.kv_bytes_per_token(dt, kv_heads) * model.n_global_layers / model.n_layers
    attn_intensity = 4 * q * model.n_global_layers * heads * model.head_dim / per_token_kv
    if attn_intensity >= balance:
        return math.inf
    return 2 * p * q / (per_token_kv * (balance - attn_intensity))
