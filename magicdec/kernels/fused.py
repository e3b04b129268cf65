"""Fused elementwise kernels for the CUDA decode path, in Triton.

A decode step of a 32-layer model in eager PyTorch launches ~45 kernels per layer, most of them
tiny elementwise ops (RMSNorm alone is seven); at batch 1 their launch gaps cost as much as reading
the weights. These kernels do the same math in one launch each:
- `rms_norm`: y = w · (x / √(mean(x²) + ε)), statistics in float32, rounded like the eager op;
- `add_rms_norm`: the residual add before a norm, x ← x + δ (rounded to the model's dtype), then y;
- `rope_`: rotates the query and key heads of the fused q/k/v projection output in place (rotate-half
  layout), so q, k and v are then strided views of one buffer;
- `silu_mul`: silu(gate) · up from the fused gate/up projection output.
Every size may be any number (head dims of 80 or 96, hidden sizes of 576): each kernel works on a
power-of-two block (``tl.arange`` needs one) and masks the elements beyond the size.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for this tensor: on CUDA when Triton is installed (and, for tests
    under TRITON_INTERPRET=1, on the CPU when MAGICDEC_TRITON_ON_CPU=1)."""
    if triton is None:
        return False
    return x.is_cuda or os.environ.get("MAGICDEC_TRITON_ON_CPU") == "1"


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, W, Y, sx, sy, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / N
        xn = (x * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)
        w = tl.load(W + cols, mask=mask, other=0.0)
        tl.store(Y + row * sy + cols, (w.to(tl.float32) * xn.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(X, DELTA, W, XO, Y, sx, sd, sxo, sy, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(DELTA + row * sd + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + d).to(XO.dtype.element_ty)
        tl.store(XO + row * sxo + cols, s, mask=mask)
        s32 = s.to(tl.float32)
        var = tl.sum(s32 * s32, axis=0) / N
        xn = (s32 * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)
        w = tl.load(W + cols, mask=mask, other=0.0)
        tl.store(Y + row * sy + cols, (w.to(tl.float32) * xn.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(QKV, COS, SIN, s_row, s_cos, n_heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_HALF)  # HALF padded to a power of two
        dmask = d < HALF
        mask = (heads < n_heads)[:, None] & dmask[None, :]
        c = tl.load(COS + row * s_cos + d, mask=dmask, other=0.0).to(tl.float32)  # cos/sin repeat over the halves
        s = tl.load(SIN + row * s_cos + d, mask=dmask, other=0.0).to(tl.float32)
        base = QKV + row * s_row + heads[:, None] * (2 * HALF) + d[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(base, (x1 * c - x2 * s).to(QKV.dtype.element_ty), mask=mask)
        tl.store(base + HALF, (x2 * c + x1 * s).to(QKV.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(GU, Y, s_gu, s_y, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        g = tl.load(GU + row * s_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * s_gu + F + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * s_y + cols, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), shape[-1], eps,
                                     BLOCK=triton.next_power_of_2(shape[-1]))
    return y.view(shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + δ, rms_norm(x + δ)) in one pass."""
    shape = x.shape
    x2, d2 = x.reshape(-1, shape[-1]).contiguous(), delta.reshape(-1, shape[-1]).contiguous()
    xo, y = torch.empty_like(x2), torch.empty_like(x2)
    _add_rms_norm_kernel[(x2.shape[0],)](x2, d2, weight, xo, y, x2.stride(0), d2.stride(0), xo.stride(0),
                                         y.stride(0), shape[-1], eps, BLOCK=triton.next_power_of_2(shape[-1]))
    return xo.view(shape), y.view(shape)


def rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first `n_heads` heads (queries then keys) of each row of qkv [B, T, W];
    cos/sin [B, 1, T, head_dim] as the rotary embedding returns them."""
    B, T, W = qkv.shape
    rows = qkv.view(B * T, W)
    c = cos.reshape(B * T, head_dim)
    s = sin.reshape(B * T, head_dim)
    block_h = min(16, triton.next_power_of_2(n_heads))
    _rope_kernel[(B * T, triton.cdiv(n_heads, block_h))](rows, c, s, rows.stride(0), c.stride(0), n_heads,
                                                         HALF=head_dim // 2,
                                                         BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
                                                         BLOCK_H=block_h)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for gate_up [..., 2F] laid out [gate | up]."""
    shape = gate_up.shape
    F = shape[-1] // 2
    gu = gate_up.reshape(-1, shape[-1])
    y = torch.empty((gu.shape[0], F), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(F))
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(F, block))](gu, y, gu.stride(0), y.stride(0), F, BLOCK=block)
    return y.view(*shape[:-1], F)
