"""The one decoder, driven by its `ModelConfig` layer by layer (Llama 2/3, Mistral, Qwen2/3, Gemma 2/3,
Phi-3, OLMo 2, Granite, SmolLM2/3, and the mixtures of experts Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GPT-OSS):
RMSNorm (where the model puts it), RoPE per layer (or none), grouped-query attention with optional q/k/v (and
output) biases, q/k norms and attention sinks, sliding or global per layer (the cache applies the window),
SwiGLU or GeGLU, or a mixture of experts (`moe.py`), tied or untied embeddings, the Gemma and Granite multipliers.

`forward(input_ids, positions, cache)` knows nothing about speculation or parallelism: it asks the
cache to prepare one step for the given positions and hands each layer's new keys and values to that
step, which stores them and returns the attention output. Tensor parallelism shards these modules
in place after loading (`magicdec.parallel`) and adjusts the head counts stored on them.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from magicdec.config import ModelConfig
from magicdec.kernels import fused
from magicdec.kernels.fused import use_triton
from magicdec.model.linear import Linear
from magicdec.model.moe import MoE
from magicdec.model.rope import RotaryEmbedding, apply_rope


class CacheStep(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Store k, v [B, Hkv, T, D] for this step and return attention of q [B, Hq, T, D]; `sinks` [Hq]: a
        learned logit per query head added to each softmax's denominator (GPT-OSS), or None."""
        ...


class Cache(Protocol):
    def begin(self, positions: torch.Tensor) -> CacheStep:
        """Prepare one forward of tokens at `positions` [B, T] (-1 marks padding)."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            return fused.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after adding `delta` (a sublayer's output), and its norm."""
        if delta is None:
            return x, self(x)
        if use_triton(x):
            return fused.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


Rotation = tuple[torch.Tensor, torch.Tensor] | None  # a layer's (cos, sin), or None for a NoPE layer


class Attention(nn.Module):
    """Fused q/k/v projection laid out [q heads | k heads | v heads], so sharding by heads stays a
    slice of each part; optional q/k RMSNorm before RoPE, per head (Qwen3, Gemma 3) or over all heads
    (OLMo 2); a q·k multiplier other than 1/√d folded into q (Gemma's query_pre_attn_scalar, Granite's)."""

    def __init__(self, cfg: ModelConfig, layer: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = cfg.q_size + 2 * cfg.kv_size
        self.wqkv = Linear(cfg.hidden_size, qkv, bias=cfg.attention_bias, device=device)
        self.wo = Linear(cfg.q_size, cfg.hidden_size, bias=False, device=device)
        # Llama's attention_bias: added after `wo` (and after its tensor-parallel all-reduce), so once
        self.wo_bias = nn.Parameter(torch.zeros(cfg.hidden_size, device=device)) if cfg.o_proj_bias else None
        self.qk_norm = cfg.qk_norm
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(cfg.q_size if full else cfg.head_dim, cfg.rms_norm_eps, device)
            self.k_norm = RMSNorm(cfg.kv_size if full else cfg.head_dim, cfg.rms_norm_eps, device)
        self.q_mult = cfg.scale * cfg.head_dim ** 0.5  # 1 unless the model's scale is not 1/√d
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads, device=device)) if cfg.attn_sinks else None
        self.full_rotary = cfg.rope_dim == cfg.head_dim

    def forward(self, x: torch.Tensor, rope: Rotation, step: CacheStep) -> torch.Tensor:
        B, T, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x)
        fused_rope = use_triton(qkv) and rope is not None and not self.qk_norm and self.full_rotary
        if fused_rope:  # rotate q and k in place; q, k, v stay strided views of one buffer
            assert rope is not None
            fused.rope_(qkv, rope[0], rope[1], hq + hkv, d)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, T, -1, d).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if not fused_rope and rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.q_mult != 1.0:
            q = q * self.q_mult
        att = step.attend(self.layer, q, k, v) if self.sinks is None else step.attend(self.layer, q, k, v, self.sinks)
        out = self.wo(att.transpose(1, 2).reshape(B, T, hq * d))
        return out if self.wo_bias is None else out + self.wo_bias


class MLP(nn.Module):
    """SwiGLU (or GeGLU: the tanh-approximated GELU gate of Gemma) with gate and up fused as [gate | up]."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.intermediate, self.act = cfg.intermediate_size, cfg.hidden_act
        self.w_gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, device=device)
        self.w_down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)
        if self.act == "silu" and use_triton(gate_up):
            return self.w_down(fused.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        act = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.w_down(act * up)


def _add_norm(norm: RMSNorm | None, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream after adding `delta`, and what the sublayer reads: its norm, or the stream itself."""
    if norm is not None:
        return norm.add_forward(x, delta)
    x = x if delta is None else x + delta
    return x, x


class Block(nn.Module):
    """One layer. Norms where the model puts them: before each sublayer ("pre", Llama), before and after
    ("sandwich", Gemma 2/3), after only ("post", OLMo 2); each sublayer's output times `residual_scale`."""

    def __init__(self, cfg: ModelConfig, layer: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        pre, post = cfg.norm_placement != "post", cfg.norm_placement != "pre"
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)  # noqa: E731
        self.attn_norm = norm() if pre else None
        self.attn = Attention(cfg, layer, device)
        self.post_attn_norm = norm() if post else None
        self.mlp_norm = norm() if pre else None
        self.mlp: nn.Module = MoE(cfg, device) if cfg.is_moe_layer(layer) else MLP(cfg, device)
        self.post_mlp_norm = norm() if post else None
        self.residual_scale = cfg.residual_scale

    def _out(self, norm: RMSNorm | None, y: torch.Tensor) -> torch.Tensor:
        y = y if norm is None else norm(y)
        return y if self.residual_scale == 1.0 else y * self.residual_scale

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, rope: Rotation,
                step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the residual stream and the previous block's pending output; returns the stream and
        this block's MLP output, which the next norm adds (so each add fuses into a norm)."""
        x, h = _add_norm(self.attn_norm, x, delta)
        x, h = _add_norm(self.mlp_norm, x, self._out(self.post_attn_norm, self.attn(h, rope, step)))
        return x, self._out(self.post_mlp_norm, self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        """`device="meta"` builds the module without allocating or initialising weights (loaders)."""
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device)
        self.layers = nn.ModuleList(Block(cfg, i, device) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg)

    @property
    def kv_heads(self) -> int:
        """KV heads held by this process (all of them, or this rank's shard)."""
        return self.layers[0].attn.n_kv_heads

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [B, T] → logits [B, T, V], or [B, N, V] for the token indices in
        `logits_index` [B, N] (e.g. only each prompt's last token during prefill)."""
        cfg = self.config
        step = cache.begin(positions)
        x = self.embed(input_ids)
        if cfg.embed_scale != 1.0:
            x = x * cfg.embed_scale
        ropes = self.rope(positions, x.dtype)
        delta = None
        for block, rope in zip(self.layers, ropes):
            x, delta = block(x, delta, rope, step)
        if logits_index is not None:
            index = logits_index[..., None].expand(-1, -1, x.shape[-1])
            x, delta = x.gather(1, index), delta.gather(1, index) if delta is not None else None
        logits = self.lm_head(self.norm.add_forward(x, delta)[1])
        if cfg.logits_scale != 1.0:
            logits = logits / cfg.logits_scale
        if cfg.final_softcap:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits
