"""Split-KV ("flash-decoding") attention for decode-shaped blocks on CUDA, written in Triton.

One program handles one (sequence, KV head, split of the cache): it reads that split's keys and
values once for all g·T query rows that share the KV head (GQA folded into rows), computes an
online softmax in float32, and writes a partial output with its log-sum-exp; the splits are merged
afterwards. Splits have a fixed size, so the work is spread over enough programs when a few
sequences have long contexts, and the reduction order of each query row does not depend on how
many queries or sequences share the launch.

Which keys a query sees is computed in the kernel from positions, not read from a mask:
- a key's position is its slot index (the target's dense cache) or a tag read from `key_pos`
  (the draft's sparse cache, -1 = empty slot);
- a query at position p sees keys at positions ≤ p; with `window` > 0 only those > p − window,
  except the first `n_kept` slots (attention sinks or selected positions);
- padding queries (position -1) see slot 0 only, so their (ignored) output stays finite.
Programs stop at the last key their sequence can see, so a short sequence in a long buffer costs
only its own length. No host synchronisation: the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch does not bring Triton
    triton = None
    tl = None

SPLIT = 1024  # keys per program: 32K contexts give 32 splits, enough programs at batch 1
BLOCK_N = 64  # keys per inner iteration
MIN_ROWS = 16  # tl.dot needs at least 16 rows


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _partial_kernel(
        Q, K, V, QPOS, KPOS, O, LSE,
        sqb, sqh, sqr,
        skb, skh, sks,
        svb, svh, svs,
        sob, soh, sos, sor,
        slb, slh, sls,
        spb, skpb,
        S, T, R, window, n_kept, scale,
        D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
        HAS_KPOS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)  # 64-bit: batch × stride overflows 32 bits for big caches
        h = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2)
        rows = tl.arange(0, BLOCK_R)
        rmask = rows < R
        dims = tl.arange(0, D)
        qp = tl.load(QPOS + b * spb + rows % T, mask=rmask, other=-1)
        valid = qp >= 0
        qpc = tl.where(valid, qp, 0)
        lo = sp * SPLIT
        hi = tl.minimum(lo + SPLIT, S)
        if not HAS_KPOS:  # slot = position: nothing beyond the furthest query
            hi = tl.minimum(hi, tl.max(qpc, axis=0) + 1)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqr + dims[None, :], mask=rmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < hi
            k = tl.load(K + b * skb + h * skh + cols[:, None] * sks + dims[None, :], mask=cmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            if HAS_KPOS:
                kp = tl.load(KPOS + b * skpb + cols, mask=cmask, other=-1)
            else:
                kp = cols
            vis = cmask[None, :] & (kp[None, :] >= 0) & (kp[None, :] <= qpc[:, None])
            if window > 0:
                vis = vis & ((cols[None, :] < n_kept) | (kp[None, :] > qpc[:, None] - window))
            vis = tl.where(valid[:, None], vis, cols[None, :] == 0)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svs + dims[None, :], mask=cmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
        tl.store(O + b * sob + h * soh + sp * sos + rows[:, None] * sor + dims[None, :], out, mask=rmask[:, None])
        tl.store(LSE + b * slb + h * slh + sp * sls + rows, lse, mask=rmask)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor | None = None,
    window: int = 0,
    n_kept: int = 0,
) -> torch.Tensor:
    """q [B, Hq, T, D]; k, v [B, Hkv, S, D] (any strides with a contiguous last dimension);
    query_pos [B, T] (-1: padding); key_pos [B, S] or None (slot index = position) → [B, Hq, T, D]."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    R = g * T
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim must be a power of two ≥ 16 for the Triton kernel, got {D}")
    qf = q.reshape(B, Hkv, R, D)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("keys and values need a contiguous last dimension")
    splits = max(1, math.ceil(S / SPLIT))
    block_r = max(MIN_ROWS, triton.next_power_of_2(R))
    out = torch.empty((B, Hkv, splits, R, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, Hkv, splits, R), dtype=torch.float32, device=q.device)
    qpos = query_pos.to(torch.int32)
    kpos = key_pos.to(torch.int32) if key_pos is not None else qpos
    _partial_kernel[(B, Hkv, splits)](
        qf, k, v, qpos, kpos, out, lse,
        qf.stride(0), qf.stride(1), qf.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        qpos.stride(0), kpos.stride(0),
        S, T, R, window, n_kept, 1.0 / math.sqrt(D),
        D=D, BLOCK_R=block_r, BLOCK_N=BLOCK_N, SPLIT=SPLIT, HAS_KPOS=key_pos is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32 (no TF32)
    )
    if splits == 1:
        merged = out[:, :, 0]
    else:
        m = lse.amax(dim=2, keepdim=True)
        w = torch.exp(lse - torch.where(torch.isinf(m), 0.0, m))  # [B, Hkv, splits, R]
        merged = (out * w[..., None]).sum(2) / w.sum(2)[..., None]
    return merged.to(q.dtype).view(B, Hq, T, D)
