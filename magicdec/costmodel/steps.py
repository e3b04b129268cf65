"""Bytes, FLOPs and roofline time of the three steps of speculative decoding, and `CostModel`.

- T_T: one decode step of the target (1 new token per sequence over its full KV cache);
- T_V(γ): one verification forward of γ+1 tokens per sequence over the full cache;
- T_D: one draft step (1 token per sequence): self-speculation (the target's weights over a sparse
  cache of `budget` tokens) or a separate draft model (its own weights, full or budgeted cache).

Counts are per GPU under tensor parallelism `tp`: weights, query heads, MLP columns and the vocab are
split `tp` ways; KV heads too, but never below one per GPU (replicated when tp > n_kv_heads).
Each operation's time is its own roofline, max(bytes/bandwidth, FLOPs/FLOP/s), and the step time
is their sum: decode runs one kernel per operation back to back, so a memory-bound kernel (the KV
read) cannot hide a compute-bound one (a large verification matmul). A per-layer roofline would
overlap them and underestimate T_V at large batch. Add to that 2 all-reduces per layer (ring:
2(tp−1)/tp × message / link bandwidth + latency), one all-gather of the logits, and the fixed
overheads (per step, and per layer). RMSNorms, RoPE and activations of the norms are neglected.
A mixture of experts' MLP reads the experts its step's tokens route to (`costmodel.experts`): more with
every token, so for a MoE T_V(γ)/T_T grows with γ where a dense model's weight term stays flat.
Everything is plain Python arithmetic: `CostModel` is called every speculation round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

from magicdec.config import ModelConfig
from magicdec.costmodel import analysis, experts
from magicdec.costmodel.experts import Routing
from magicdec.costmodel.hardware import HardwareProfile
from magicdec.spec.config import SpecConfig

Context = int | Sequence[int]


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a step, summed over layers: bytes moved and FLOPs, per GPU."""

    name: str
    bytes: float
    flops: float


@dataclass(frozen=True, slots=True)
class StepCost:
    """What one forward step moves and computes on one GPU, and what it communicates."""

    ops: tuple[Op, ...]
    n_layers: int
    n_allreduce: int  # all-reduces of `allreduce_bytes` each
    allreduce_bytes: float
    gather_bytes: float  # the logits all-gather (0 when tp == 1)
    tp: int

    @property
    def total_bytes(self) -> float:
        return sum(op.bytes for op in self.ops)

    @property
    def total_flops(self) -> float:
        return sum(op.flops for op in self.ops)


def _contexts(batch: int, context: Context) -> list[int]:
    """Per-sequence contexts as a list (not copied when given one: `gamma=auto` calls this every round)."""
    ctx = [context] * batch if isinstance(context, int) else context if isinstance(context, list) else list(context)
    if batch > 0 and len(ctx) != batch:
        raise ValueError(f"got {len(ctx)} per-sequence contexts for batch {batch}")
    if batch <= 0 or min(ctx) < 0:
        raise ValueError(f"batch must be positive and contexts non-negative (batch {batch})")
    return ctx


def count_step(model: ModelConfig, batch: int, q_tokens: int, attended: float, dtype_bytes: int = 2,
               tp: int = 1, weight_bytes: float | None = None, routing: Routing | None = None) -> StepCost:
    """Bytes and FLOPs of a forward of `q_tokens` new tokens per sequence for `batch` sequences
    whose attention reads `attended` KV tokens in total (summed over sequences, new ones included).
    `weight_bytes`: bytes per weight of the linear layers when they are quantized (default: dtype_bytes).
    A MoE layer reads its router, its shared expert and the routed experts its batch·q_tokens tokens are
    expected to pick (`experts.expected_active_experts`; uniform routing unless `routing`)."""
    if tp < 1 or q_tokens < 1:
        raise ValueError(f"tp and q_tokens must be >= 1 (got tp={tp}, q_tokens={q_tokens})")
    dt, d, hd, L = dtype_bytes, model.hidden_size, model.head_dim, model.n_layers
    w = dt if weight_bytes is None else weight_bytes
    t = batch * q_tokens  # tokens in the step
    qh = math.ceil(model.n_heads / tp)
    kvh = math.ceil(model.n_kv_heads / tp)  # >= 1: KV heads replicated when tp > n_kv_heads
    f = math.ceil(model.intermediate_size / tp)
    v = math.ceil(model.vocab_size / tp)
    qkv = (qh + 2 * kvh) * hd
    n_moe = experts.moe_layer_count(model)
    ld = L - n_moe  # layers with a dense MLP: all of a dense model's
    ops = [
        Op("qkv", L * (w * d * qkv + dt * t * (d + qkv)), L * 2 * t * d * qkv),
        Op("attention", L * dt * (2 * kvh * hd * attended + 2 * t * qh * hd),
           L * 4 * q_tokens * attended * qh * hd),
        Op("kv_write", L * dt * t * 2 * kvh * hd, 0.0),
        Op("o_proj", L * (w * qh * hd * d + dt * t * (qh * hd + d)), L * 2 * t * qh * hd * d),
    ]
    if ld:
        ops += [Op("mlp_gate_up", ld * (w * 2 * d * f + dt * t * (d + 2 * f)), ld * 4 * t * d * f),
                Op("mlp_down", ld * (w * f * d + dt * t * (f + d)), ld * 2 * t * f * d)]
    if n_moe:
        ops += _moe_ops(model, t, n_moe, dt, w, tp, routing)
    ops += [Op("lm_head", w * v * d + dt * t * (d + v), 2 * t * d * v), Op("embedding", dt * 2 * t * d, 0.0)]
    n_ar = 2 * L if tp > 1 else 0
    return StepCost(tuple(ops), L, n_ar, float(t * d * dt), float(t * model.vocab_size * dt) if tp > 1 else 0.0,
                    tp)


def _moe_ops(model: ModelConfig, t: int, n_moe: int, dt: int, w: float, tp: int,
             routing: Routing | None) -> list[Op]:
    """The MLPs of the MoE layers for `t` tokens: the router (E columns, replicated), the routed experts (the
    expected distinct ones read, each token computing through k of them), the shared expert if any."""
    d, e, k = model.hidden_size, model.n_experts, model.n_experts_per_token
    fm = math.ceil(experts.expert_size(model) / tp)
    we = experts.expert_weight_bytes(model, w)
    read = n_moe * experts.expected_active_experts(model, t, routing)  # experts read, summed over MoE layers
    ops = [
        Op("router", n_moe * dt * (d * e + t * (d + e)), n_moe * 2 * t * d * e),
        Op("experts_gate_up", we * read * 2 * d * fm + n_moe * dt * t * k * (d + 2 * fm), n_moe * 4 * t * k * d * fm),
        Op("experts_down", we * read * fm * d + n_moe * dt * t * k * (fm + d), n_moe * 2 * t * k * fm * d),
    ]
    if model.shared_expert_intermediate_size:
        fs = math.ceil(model.shared_expert_intermediate_size / tp)
        ops.append(Op("shared_expert", n_moe * (w * 3 * d * fs + dt * t * (2 * d + 3 * fs)), n_moe * 6 * t * d * fs))
    return ops


def step_time(cost: StepCost, hw: HardwareProfile, dtype_bytes: int = 2) -> float:
    """Seconds: per-operation roofline, summed, plus communication and fixed overheads."""
    bw, peak = hw.effective_bandwidth, hw.effective_flops(dtype_bytes)
    t = sum(max(op.bytes / bw, op.flops / peak) for op in cost.ops)
    return t + comm_time(cost, hw) + hw.step_overhead_s + cost.n_layers * hw.layer_overhead_s


def comm_time(cost: StepCost, hw: HardwareProfile) -> float:
    if cost.tp == 1:
        return 0.0
    link = hw.effective_interconnect
    if link <= 0:
        raise ValueError(f"hardware {hw.name!r} has no interconnect bandwidth; cannot model tp={cost.tp}")
    ring = (cost.tp - 1) / cost.tp
    allreduce = cost.n_allreduce * (hw.allreduce_latency_s + 2 * ring * cost.allreduce_bytes / link)
    gather = hw.allreduce_latency_s + ring * cost.gather_bytes / link
    return allreduce + gather


@dataclass(frozen=True, slots=True)
class DraftSpec:
    """Who drafts, as `SpecConfig.method` says: ``"self"`` (the target's weights, sparse cache) or
    ``"draft"`` (a separate model).

    `budget` is the draft's KV budget in tokens (StreamingLLM sinks + window); None = full cache.
    `tp` is the draft model's tensor-parallel degree (None = the target's). `weight_bits`: a self-draft
    with the target's weights quantized to 8 or 4 bits (None = the weights as they are).
    """

    kind: str
    budget: int | None = 512
    model: ModelConfig | None = None
    tp: int | None = None
    weight_bits: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("self", "draft"):
            raise ValueError(f"draft kind must be 'self' or 'draft', got {self.kind!r}")
        if self.kind == "draft" and self.model is None:
            raise ValueError("a 'draft' drafter needs its ModelConfig")
        if self.kind == "self" and self.model is not None:
            raise ValueError("a 'self' drafter uses the target's weights; do not pass a model")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"draft budget must be positive or None (full cache), got {self.budget}")
        if self.tp is not None and self.tp < 1:
            raise ValueError(f"draft tp must be >= 1, got {self.tp}")
        if self.weight_bits not in (None, 4, 8):
            raise ValueError(f"draft weight_bits must be None, 8 or 4, got {self.weight_bits}")


def draft_spec(spec: SpecConfig, draft: ModelConfig | None = None) -> DraftSpec:
    """The cost model's view of a speculation setting (`draft`: the draft model's config, if any)."""
    budget = None if spec.drafter == "full" else spec.budget
    if spec.method != "self":
        return DraftSpec("draft", budget, draft)
    return DraftSpec("self", budget, weight_bits=WEIGHT_BITS[spec.draft_weights])


WEIGHT_BITS = {"full": None, "int8": 8, "int4": 4}
# bytes per quantized weight: int8 with a float32 scale per output row (negligible); int4 with a bfloat16
# scale and a bfloat16 zero per group of 32 weights (0.5 + 4/32 bytes: what magicdec.model.quant stores)
QUANT_WEIGHT_BYTES = {8: 1.0, 4: 0.5 + 4 / 32}


RING_SLACK = 512 + 2 * 64  # what a sliding layer holds beyond its window: a default prefill chunk and two blocks


def _held_tokens(model: ModelConfig, ctx: list[int], extra: int) -> float:
    """KV tokens the pool holds for contexts `ctx` (each plus `extra`), on average over the layers: every
    token for a global layer; a sliding layer, where the engine releases its blocks (`layer_groups`), at
    most its window and a step's tokens (the scheduler's rings)."""
    full = float(sum(n + extra for n in ctx))
    if model.layer_groups is None:
        return full
    windows = model.layer_windows
    total = model.n_global_layers * full
    for w in set(windows) - {0}:
        total += windows.count(w) * float(sum(min(n + extra, w + RING_SLACK) for n in ctx))
    return total / model.n_layers


class CostModel:
    """Predicted step times and speculative speedup for one target, drafter and machine."""

    __slots__ = ("target", "hardware", "draft", "dtype_bytes", "tp", "routing", "_draft_model", "_draft_tp")

    def __init__(self, target: ModelConfig, hardware: HardwareProfile, draft: DraftSpec,
                 dtype_bytes: int = 2, tp: int = 1, routing: Routing | None = None) -> None:
        """`routing`: the target's measured routing distribution (a MoE; default uniform), which a self-draft
        shares."""
        if routing is not None:
            routing.check(target)
        if dtype_bytes not in (2, 4):
            raise ValueError(f"dtype_bytes must be 2 or 4, got {dtype_bytes}")
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.target, self.hardware, self.draft = target, hardware, draft
        self.dtype_bytes, self.tp, self.routing = dtype_bytes, tp, routing
        self._draft_model = target if draft.kind == "self" else draft.model
        self._draft_tp = tp if draft.tp is None else draft.tp

    # ---- step costs ----------------------------------------------------------------------------
    @staticmethod
    def _attended(model: ModelConfig, ctx: list[int], cap: int | None, q_tokens: int) -> float:
        """KV tokens read per layer, on average over the layers, summed over the batch: a global layer reads
        each context (capped at the draft budget `cap`) plus the new tokens; a sliding layer at most its
        window, whoever reads it (a draft reads a sliding layer as the target does)."""
        windows = model.layer_windows
        if not any(windows):  # the usual case, summed at C speed
            capped = sum(ctx) if cap is None else sum(map(min, ctx, repeat(cap)))
            return float(capped + len(ctx) * q_tokens)
        glob = 0.0
        if model.n_global_layers:
            glob = float((sum(ctx) if cap is None else sum(map(min, ctx, repeat(cap)))) + len(ctx) * q_tokens)
        total = model.n_global_layers * glob
        for w in set(windows) - {0}:
            total += windows.count(w) * float(sum(min(n + q_tokens, w) for n in ctx))
        return total / model.n_layers

    def target_cost(self, batch: int, context: Context, q_tokens: int = 1) -> StepCost:
        attended = self._attended(self.target, _contexts(batch, context), None, q_tokens)
        return count_step(self.target, batch, q_tokens, attended, self.dtype_bytes, self.tp, routing=self.routing)

    def draft_cost(self, batch: int, context: Context) -> StepCost:
        m = self._draft_model
        assert m is not None
        attended = self._attended(m, _contexts(batch, context), self.draft.budget, 1)
        bits = self.draft.weight_bits
        return count_step(m, batch, 1, attended, self.dtype_bytes, self._draft_tp,
                          None if bits is None else QUANT_WEIGHT_BYTES[bits],
                          self.routing if self.draft.kind == "self" else None)

    # ---- times (seconds) -----------------------------------------------------------------------
    def t_target(self, batch: int, context: Context) -> float:
        return step_time(self.target_cost(batch, context), self.hardware, self.dtype_bytes)

    def t_verify(self, batch: int, context: Context, gamma: int) -> float:
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        return step_time(self.target_cost(batch, context, gamma + 1), self.hardware, self.dtype_bytes)

    def t_draft(self, batch: int, context: Context) -> float:
        return step_time(self.draft_cost(batch, context), self.hardware, self.dtype_bytes)

    # ---- speculation ---------------------------------------------------------------------------
    def speedup(self, batch: int, context: Context, gamma: int, alpha: float) -> float:
        if gamma == 0:
            return 1.0
        tt, td = self.t_target(batch, context), self.t_draft(batch, context)
        tv = self.t_verify(batch, context, gamma)
        return analysis.speedup(tt, tv, td, gamma, alpha, self.hardware.round_overhead_s)

    def best_gamma(self, batch: int, context: Context, alpha: float, max_gamma: int = 8) -> tuple[int, float]:
        """(γ, speedup) maximising the speedup over 0..max_gamma; γ = 0 means plain decoding."""
        tt, td = self.t_target(batch, context), self.t_draft(batch, context)
        return analysis.best_gamma(tt, lambda g: self.t_verify(batch, context, g), td, alpha, max_gamma,
                                   self.hardware.round_overhead_s)

    def t_round(self, batch: int, context: Context, gamma: int) -> float:
        """One speculation round: γ draft steps, one verification, and the round overhead."""
        return gamma * self.t_draft(batch, context) + self.t_verify(batch, context, gamma) + (
            self.hardware.round_overhead_s if gamma > 0 else 0.0)

    def memory_bytes(self, batch: int, context: Context, gamma: int = 0) -> float:
        """Device memory per GPU for weights (a quantized self-draft's copy included) and KV caches (activations
        neglected)."""
        ctx, dt = _contexts(batch, context), self.dtype_bytes
        t, m = self.target, self._draft_model
        assert m is not None
        kv_t = t.kv_bytes_per_token(dt, math.ceil(t.n_kv_heads / self.tp))
        total = experts.stored_weight_bytes(t, dt) / self.tp + kv_t * _held_tokens(t, ctx, gamma + 1)
        if self.draft.kind == "draft":
            total += experts.stored_weight_bytes(m, dt) / self._draft_tp
        elif self.draft.weight_bits is not None:  # the quantized copy of the linear layers, beside the target's
            q = QUANT_WEIGHT_BYTES[self.draft.weight_bits]
            other, routed = experts.linear_weights(t)
            stored = t.expert_weight_bits / 8  # experts stored at most as small are read as they are, not copied
            total += (other * q + (routed * q if not stored or stored > q else 0.0)) / self.tp
        if self.draft.budget is not None or self.draft.kind == "draft":
            kv_d = m.kv_bytes_per_token(dt, math.ceil(m.n_kv_heads / self._draft_tp))
            b = self.draft.budget
            total += kv_d * sum((n if b is None else min(b, n)) + gamma + 1 for n in ctx)
        return total

    def fits(self, batch: int, context: Context, gamma: int = 0) -> bool:
        """False when the caches would not fit the device's memory (True if its size is unknown)."""
        cap = self.hardware.memory_bytes
        return cap <= 0 or self.memory_bytes(batch, context, gamma) <= cap
