"""Rotary position embedding: inverse frequencies (with the scalings real checkpoints use: linear,
Llama-3, YaRN, explicit GGUF factors) and their application to query/key heads in the Hugging Face
(rotate-half) layout."""

from __future__ import annotations

import math

import torch
from torch import nn

from magicdec.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Per-pair inverse frequencies, float32, shape [head_dim // 2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "longrope":  # the short factors; `long_frequencies` gives the others
        return 1.0 / (torch.tensor(scaling.short_factor, dtype=torch.float32) * theta ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.freq_factors:  # GGUF checkpoints carry Llama-3 scaling as explicit per-pair factors
        return inv_freq / torch.tensor(scaling.freq_factors, dtype=torch.float32)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    if scaling.rope_type == "yarn":
        return _yarn_scaled(inv_freq, head_dim, theta, scaling)
    return inv_freq


def _yarn_scaled(inv_freq: torch.Tensor, head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN "NTK-by-parts": pairs that turn fewer than `beta_slow` times over the original context
    are interpolated (divided by `factor`), pairs that turn more than `beta_fast` times are kept, and a
    linear ramp over the pair index blends the two in between."""

    def pair_index(rotations: float) -> float:  # the (fractional) pair that turns `rotations` times
        turns = s.original_max_position_embeddings / (rotations * 2 * math.pi)
        return head_dim * math.log(turns) / (2 * math.log(theta))

    low, high = pair_index(s.beta_fast), pair_index(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama-3.1 frequency-dependent interpolation: long wavelengths divided by `factor`,
    short ones kept, and a smooth blend between the two thresholds."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def long_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """LongRoPE's inverse frequencies with its long factors (a row reaching past the original context)."""
    return 1.0 / (torch.tensor(scaling.long_factor, dtype=torch.float32) * theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class Rope(nn.Module):
    """One RoPE (θ, scaling, rotated dimensions): integer positions [B, T] → (cos, sin) [B, 1, T, dim].

    LongRoPE (Phi-3) switches, as transformers does, per forward and row: a row whose largest position
    reaches past the original context rotates with the long factors, otherwise the short ones (keys cached
    before the switch keep their rotation)."""

    def __init__(self, dim: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(dim, theta, scaling), persistent=False)
        self.longrope = scaling.rope_type == "longrope"
        if self.longrope:
            self.register_buffer("long_freq", long_frequencies(dim, theta, scaling), persistent=False)
        self.original = scaling.original_max_position_embeddings
        self.attention_scaling = scaling.attention_scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin times the attention factor (YaRN's, LongRoPE's; 1 otherwise), as transformers does."""
        pos = positions.to(torch.float32)[..., None]
        if self.longrope:
            long = (positions.amax(dim=1) + 1 > self.original)[:, None, None]
            freqs = pos * torch.where(long, self.long_freq, self.inv_freq)
        else:
            freqs = pos * self.inv_freq  # [B, T, D/2], float32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


class RotaryEmbedding(nn.Module):
    """Every layer's RoPE: the distinct ones (Gemma 3's global and local θ, …) computed once per forward;
    None for a layer without positions (NoPE)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        kinds: list[tuple[float, RopeScaling]] = []
        self.layer_kind: list[int] = []
        for layer in range(cfg.n_layers):
            kind = cfg.layer_rope(layer)
            if kind is None:
                self.layer_kind.append(-1)
                continue
            if kind not in kinds:
                kinds.append(kind)
            self.layer_kind.append(kinds.index(kind))
        self.ropes = nn.ModuleList(Rope(cfg.rope_dim, theta, scaling) for theta, scaling in kinds)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        tables = [rope(positions, dtype) for rope in self.ropes]
        return [None if k < 0 else tables[k] for k in self.layer_kind]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate heads x [B, H, T, D] by the angles in cos/sin [B, 1, T, R]: the first R ≤ D dimensions
    (partial rotary), the others passed through."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
