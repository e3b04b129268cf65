"""Split-KV ("flash-decoding") attention for decode-shaped blocks on CUDA, written in Triton.

One program handles one (sequence, KV head, split of the cache): it reads that split's keys and
values once for all g·T query rows that share the KV head (GQA folded into rows), computes an
online softmax in float32, and writes a partial output with its log-sum-exp; a second kernel
merges the splits. Splits have a fixed size, so the work is spread over enough programs when a
few sequences have long contexts (and not at all for large batches), and the reduction order of each
query row does not depend on how many queries share the launch.

Which keys a query sees is computed in the kernel from positions, not read from a mask:
- a key's position is its slot index (the target's dense cache) or a tag read from `key_pos`
  (the draft's sparse cache, -1 = empty slot);
- a query at position p sees keys at positions ≤ p; with `window` > 0 only those > p − window,
  except the first `n_kept` slots (attention sinks or selected positions);
- padding queries (position -1) see slot 0 only, so their (ignored) output stays finite.
Programs stop at the last key their sequence can see, so a short sequence in a long buffer costs
only its own length. Queries are read through their strides and the output is written as
[B, T, Hq, D], the layout the output projection takes, so no copies surround the kernel. No host
synchronisation: the launch can be captured in a CUDA graph. Any head dim works: the kernels work on a
power-of-two block of dims (``tl.arange`` needs one, ``tl.dot`` at least 16) and mask the dims beyond D,
which load as 0 (adding nothing to a score) and are never stored (80, 96, 112 ... cost the next power of two).

The partial kernel also serves `magicdec.kernels.paged_attention` (``PAGED``: each block of keys is read from
the page a block table names instead of the row's dense buffer; ``SCORES``: it also writes each query row's
largest logit per block of keys, for the guided draft's block scores); `split_kv_attention` launches it and
the merge for both.
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch does not bring Triton
    triton = None
    tl = None

BLOCK_N = 64  # keys per inner iteration
MIN_ROWS = 16  # tl.dot needs at least 16 rows
MIN_DIMS = 16  # ... and a reduction of at least 16
MIN_SPLIT = 512  # keys per program at least
PROGRAMS_PER_SM = 8  # enough independent streams of loads per SM to keep HBM busy


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def split_size(S: int, rows: int, kv_heads: int, device: torch.device) -> int:
    """Keys per program: few long sequences are split across many programs (flash-decoding), a large
    batch is not split at all (no partial outputs to merge). `rows` is the cache's allocated batch, so
    the split — hence the reduction order — stays the same while a batch shrinks."""
    target = PROGRAMS_PER_SM * _sm_count(device)
    splits = max(1, min(math.ceil(S / MIN_SPLIT), math.ceil(target / (rows * kv_heads))))
    return math.ceil(S / splits / BLOCK_N) * BLOCK_N


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _partial_kernel(
        Q, K, V, TABLE, QPOS, KPOS, O, LSE, OUT, BMAX, SINKS,
        sqb, sqh, sqt,
        skb, skh, sks,
        svb, svh, svs,
        stb, spb, skpb,
        sob, soh, sos, sor,
        slb, slh, sls,
        s_outb, s_outt, s_outh,
        smb, smh, smr,
        S, T, R, G, P, window, n_kept, scale, SPLIT,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_KPOS: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr,
        PAGED: tl.constexpr, SCORES: tl.constexpr, HAS_SINKS: tl.constexpr,
    ):
        """Dense (PAGED false): K, V [B, Hkv, S, D], skb / svb their batch strides; TABLE and P unused.
        Paged: K, V pools [N, Hkv, P, D], skb / svb their page strides, logical slot s of row b is slot s % P
        of page TABLE[b, s // P] (P % BLOCK_N == 0). SCORES: store each row's largest scaled logit per block
        of BLOCK_N keys in BMAX[b, h, row, block] and each split's LSE even with a single split. HAS_SINKS: SINKS
        [Hq] float32 logits added to the softmax's denominator (here with a single split, else by the merge; the
        LSEs stay the keys' own)."""
        b = tl.program_id(0).to(tl.int64)  # 64-bit: batch × stride overflows 32 bits for big caches
        h = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2)
        rows = tl.arange(0, BLOCK_R)
        rmask = rows < R
        dims = tl.arange(0, BLOCK_D)  # dims ≥ D (padding to a power of two) load as 0 and are not stored
        dmask = dims < D
        t = rows % T
        head = h * G + rows // T  # query head of each folded row
        qp = tl.load(QPOS + b * spb + t, mask=rmask, other=-1)
        valid = qp >= 0
        qpc = tl.where(valid, qp, 0)
        lo = sp * SPLIT
        hi = tl.minimum(lo + SPLIT, S)
        if not HAS_KPOS:  # slot = position: nothing beyond the furthest query
            hi = tl.minimum(hi, tl.max(qpc, axis=0) + 1)
        q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + dims[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            if PAGED:  # the block [n0, n0 + BLOCK_N) lies inside one page (P % BLOCK_N == 0, n0 % BLOCK_N == 0)
                kv = tl.load(TABLE + b * stb + n0 // P).to(tl.int64)
                slots = n0 % P + tl.arange(0, BLOCK_N)
            else:
                kv = b
                slots = cols
            cmask = cols < hi
            kvmask = cmask[:, None] & dmask[None, :]
            k = tl.load(K + kv * skb + h * skh + slots[:, None] * sks + dims[None, :], mask=kvmask, other=0.0)
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
            m_blk = tl.max(s, axis=1)
            if SCORES:  # the block's largest logit per row, turned into a probability once the LSE is known
                tl.store(BMAX + b * smb + h * smh + rows * smr + n0 // BLOCK_N, m_blk, mask=rmask)
            m_new = tl.maximum(m_i, m_blk)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + kv * svb + h * svh + slots[:, None] * svs + dims[None, :], mask=kvmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        if HAS_SINKS and DIRECT:
            sink = tl.load(SINKS + head, mask=rmask, other=0.0)
            out = acc / (l_safe + tl.where(l_i > 0, tl.exp(sink - m_i), 0.0))[:, None]
        else:
            out = acc / l_safe[:, None]
        if SCORES or not DIRECT:  # the merge needs each split's LSE, the block scores the row's
            lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
            tl.store(LSE + b * slb + h * slh + sp * sls + rows, lse, mask=rmask)
        if DIRECT:  # a single split: write the final output
            dst = OUT + b * s_outb + t[:, None] * s_outt + head[:, None] * s_outh + dims[None, :]
            tl.store(dst, out.to(OUT.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        else:
            tl.store(O + b * sob + h * soh + sp * sos + rows[:, None] * sor + dims[None, :], out,
                     mask=rmask[:, None] & dmask[None, :])

    @triton.jit
    def _merge_kernel(
        O, LSE, OUT, SINKS,
        sob, soh, sos, sor,
        slb, slh, sls,
        s_outb, s_outt, s_outh,
        NS, T, G,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        r = tl.program_id(2)
        splits = tl.arange(0, BLOCK_S)
        smask = splits < NS
        dims = tl.arange(0, BLOCK_D)
        dmask = dims < D
        lse = tl.load(LSE + b * slb + h * slh + splits * sls + r, mask=smask, other=float("-inf"))
        m = tl.max(lse, axis=0)
        w = tl.where(smask, tl.exp(lse - m), 0.0)
        o = tl.load(O + b * sob + h * soh + splits[:, None] * sos + r * sor + dims[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
        t = r % T
        head = h * G + r // T
        denominator = tl.sum(w, axis=0)
        if HAS_SINKS:
            denominator = denominator + tl.where(m > float("-inf"), tl.exp(tl.load(SINKS + head) - m), 0.0)
        out = tl.sum(o * w[:, None], axis=0) / denominator
        tl.store(OUT + b * s_outb + t * s_outt + head * s_outh + dims, out.to(OUT.dtype.element_ty), mask=dmask)


def split_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor | None,
    window: int,
    n_kept: int,
    rows_hint: int | None,
    S: int,
    table: torch.Tensor | None = None,
    scores: bool = False,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Launches the partial kernel over S logical slots and, with several splits, the merge; no checks.
    k, v: dense caches [B, Hkv, S, D] (table None) or pools [N, Hkv, P, D] read through table [B, S / P].
    Returns the output [B, T, Hq, D]; the splits' LSEs [B, Hkv, splits, R] (scores or several splits);
    the block maxima [B, Hkv, R, S / BLOCK_N] (scores); the number of splits. sinks [Hq]: attention sinks."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    R = G * T
    block_d = max(MIN_DIMS, triton.next_power_of_2(D))
    split = split_size(S, rows_hint or B, Hkv, q.device)
    splits = math.ceil(S / split)
    block_r = max(MIN_ROWS, triton.next_power_of_2(R))
    dev, f32 = q.device, torch.float32
    final = torch.empty((B, T, Hq, D), dtype=q.dtype, device=dev)
    direct = splits == 1
    part = torch.empty((1, 1, 1, 1, 1) if direct else (B, Hkv, splits, R, D), dtype=f32, device=dev)
    lse = torch.empty((B, Hkv, splits, R) if scores or not direct else (1, 1, 1, 1), dtype=f32, device=dev)
    bmax = torch.full((B, Hkv, R, S // BLOCK_N), float("-inf"), dtype=f32, device=dev) if scores else lse
    kpos = key_pos if key_pos is not None else query_pos
    paged = table is not None
    tab = table if paged else query_pos  # not read by the dense kernel
    sink = lse if sinks is None else sinks.to(device=dev, dtype=f32).contiguous()  # (not read without sinks)
    _partial_kernel[(B, Hkv, splits)](
        q, k, v, tab, query_pos, kpos, part, lse, final, bmax, sink,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        tab.stride(0), query_pos.stride(0), kpos.stride(0),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        final.stride(0), final.stride(1), final.stride(2),
        bmax.stride(0), bmax.stride(1), bmax.stride(2),
        S, T, R, G, k.shape[2] if paged else BLOCK_N, window, n_kept, 1.0 / math.sqrt(D), split,
        D=D, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=BLOCK_N, HAS_KPOS=key_pos is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32 (no TF32)
        DIRECT=direct, PAGED=paged, SCORES=scores, HAS_SINKS=sinks is not None,
    )
    if not direct:
        _merge_kernel[(B, Hkv, R)](
            part, lse, final, sink,
            part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2),
            final.stride(0), final.stride(1), final.stride(2),
            splits, T, G,
            D=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits), HAS_SINKS=sinks is not None,
        )
    return final, lse, bmax, splits


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor | None = None,
    window: int = 0,
    n_kept: int = 0,
    rows_hint: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, T, D] (any strides with a contiguous last dimension); k, v [B, Hkv, S, D] (likewise);
    query_pos [B, T] int32 (-1: padding); key_pos [B, S] int32 or None (slot index = position);
    rows_hint: the cache's allocated batch (chooses the split; default B); sinks [Hq] or None: attention sinks
    (a logit per query head in the softmax's denominator, GPT-OSS).
    Returns the attention output as a [B, Hq, T, D] view of a contiguous [B, T, Hq, D] tensor."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("queries, keys and values need a contiguous last dimension")
    final = split_kv_attention(q, k, v, query_pos, key_pos, window, n_kept, rows_hint, k.shape[2], sinks=sinks)[0]
    return final.transpose(1, 2)
