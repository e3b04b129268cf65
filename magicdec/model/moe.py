"""The mixture-of-experts feed-forward of the one decoder (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GPT-OSS).

A router (a `Linear`, with a bias for GPT-OSS) scores the experts; each token takes its top k, weighted by the
softmax of all the scores taken at the top k (Mixtral, Qwen, OLMoE) or by the softmax of its k top scores
(GPT-OSS), renormalised to sum 1 where the model says so. The (token, expert) pairs are sorted by expert and
each active expert runs once on all of its tokens (one gate/up and one down matmul per active expert; no loop
over tokens). A token's k outputs are added in its top-k order, elementwise.

Batch invariance: a decode-shaped forward (the rule of `Linear`: ≤ MAX_DECODE_TOKENS tokens per sequence on
the CPU kernels) feeds each expert its rows as [n, 1, d], so every expert matmul is the batch-invariant
kernel's (an int8 draft's `QuantLinear` is batch-invariant too); routing, the activation and the weighted
sum are row-wise. So a token's output does not depend on which other tokens share its forward, and
verification gives plain decoding's tokens bit for bit.

Counting the experts a forward reads (the cost model's check): set `reads` of the MoE modules to a list
(`track_expert_reads(model)`); each forward then appends (its tokens, how many distinct experts it ran) and
adds each expert's picks to `picks`. None (the default) costs nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from magicdec.config import ModelConfig
from magicdec.kernels import cpu as cpu_kernels
from magicdec.kernels.cpu import MAX_DECODE_TOKENS
from magicdec.model.linear import Linear


class Expert(nn.Module):
    """One SwiGLU expert, gate and up fused as [gate | up]; GPT-OSS's clamped variant and biases when configured."""

    def __init__(self, cfg: ModelConfig, size: int, device: torch.device | str | None = None,
                 routed: bool = True) -> None:
        """`routed`: a routed expert (biases and GPT-OSS's activation where configured); else a shared one (SiLU)."""
        super().__init__()
        self.size = size
        self.alpha, self.limit = (cfg.swiglu_alpha, cfg.swiglu_limit) if routed else (0.0, 0.0)
        bias = cfg.expert_bias and routed
        self.w_gate_up = Linear(cfg.hidden_size, 2 * size, bias=bias, device=device)
        self.w_down = Linear(size, cfg.hidden_size, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.size, dim=-1)
        if self.alpha:  # GPT-OSS: (clamp(up) + 1) · g·σ(α g), g = min(gate, limit)
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return self.w_down((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))
        return self.w_down(F.silu(gate) * up)


class MoE(nn.Module):
    """Router, routed experts, and an optional shared expert (Qwen2-MoE: gated by σ(x·w))."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_token
        self.softmax_first, self.renormalise = cfg.router_softmax == "before", cfg.norm_topk_prob
        self.router = Linear(cfg.hidden_size, cfg.n_experts, bias=cfg.router_bias, device=device)
        self.experts = nn.ModuleList(Expert(cfg, cfg.expert_size, device) for _ in range(cfg.n_experts))
        self.shared = None
        self.shared_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared = Expert(cfg, cfg.shared_expert_intermediate_size, device, routed=False)
            if cfg.shared_expert_gate:
                self.shared_gate = Linear(cfg.hidden_size, 1, bias=False, device=device)
        self.reads: list[tuple[int, int]] | None = None  # a list: each forward's (tokens, distinct experts run)
        self.picks = [0] * cfg.n_experts  # while reads is a list: how often each expert was picked

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] → each token's top-k experts [B·T, k] and their weights [B·T, k] (in x's dtype)."""
        logits = self.router(x).reshape(-1, self.n_experts).float()
        if self.softmax_first:
            weights, experts = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        else:
            top, experts = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        decode = cpu_kernels.applies(x, T, max_tokens=MAX_DECODE_TOKENS)  # Linear's rule, for the whole forward
        experts, weights = self.route(x)
        k = self.top_k
        flat = experts.reshape(-1)  # pair i = (token i // k, its (i % k)-th expert)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        rows = x.reshape(-1, d)[order // k]
        out_rows = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n:
                part = rows[start:start + n]
                out_rows[start:start + n] = self.experts[e](part[:, None] if decode else part[None]).reshape(n, d)
                start += n
        if self.reads is not None:
            self.reads.append((B * T, sum(1 for n in counts if n)))
            self.picks = [a + b for a, b in zip(self.picks, counts)]
        y = torch.empty_like(out_rows)
        y[order] = out_rows
        y = y.view(B * T, k, d)
        out = y[:, 0] * weights[:, 0, None]
        for j in range(1, k):
            out = out + y[:, j] * weights[:, j, None]
        out = out.view(B, T, d)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out


def track_expert_reads(model: nn.Module, on: bool = True) -> list[MoE]:
    """Turn the counting of experts read on (each MoE module's `reads` a fresh list) or off (None); returns the
    MoE modules in layer order, whose `reads[i]` is the i-th forward's (tokens, distinct experts it ran) and
    `picks[e]` how often expert e was picked since."""
    modules = [m for m in model.modules() if isinstance(m, MoE)]
    for m in modules:
        m.reads = [] if on else None
        m.picks = [0] * m.n_experts
    return modules
