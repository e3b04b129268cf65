"""Split-KV ("flash-decoding") attention over a paged KV cache on CUDA, written in Triton.

The paged counterpart of `decode_attention`, launching the same kernels (its `split_kv_attention` runs the
partial kernel with ``PAGED`` set, then the merge): one program per (sequence, KV head, split of the logical
slots), all g·T query rows of a KV head folded into the rows of one tile, an online softmax in float32 —
but keys and values are read through a block table instead of from a dense [B, Hkv, S, D] buffer. Logical
slot s of row b is slot s % P of page table[b, s // P] of a pool [N, Hkv, P, D] (one layer of
`PagedKVCache`; strided views are fine). P must be a multiple of the kernel's block of keys (64): each
block then lies inside one page, so a program loads one page id per block and reads the block as one
contiguous [64, D] tile.

Visibility is computed in the kernel from positions, exactly as `decode_attention` (and `AttentionMask`)
do: a key's position is its logical slot (the target's view: nothing past the furthest query is read) or
a tag from `key_pos` [B, nb·P] (a sparse draft's view, -1 = empty slot); a query at position p sees keys
at positions ≤ p, with `window` > 0 only those > p − window except the first `n_kept` slots (sinks); a
padding query (-1) sees slot 0 only. No mask tensor, no host synchronisation, 64-bit offsets (page id ×
page stride overflows 32 bits for big pools): the launch can be captured in a CUDA graph.

Block scores (``block_scores`` [B, nb] float32, the guided self-draft's input; the semantics of
`magicdec.kernels.cpu.paged_attention`): per row b and table column p, max-accumulate the largest
attention probability that any query head and token of the row (padding queries included) gives to a
slot of page p. A probability needs the row's final log-sum-exp, which with several splits only the merge
knows, so it takes two steps: the partial kernel writes, per query row and block of 64 keys, the largest
scaled logit it saw (it has it anyway: the block max of the online softmax) and each split's LSE; a third
small kernel (one program per row and group of table columns, no atomics) merges the splits' LSEs, takes
exp(max logit − LSE) over the rows and blocks of each page and max-accumulates it into ``block_scores``.
The extra traffic is 4 bytes per query row and block of 64 keys; keys are read once.
"""

from __future__ import annotations

import torch

from magicdec.kernels.decode_attention import BLOCK_N, split_kv_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch does not bring Triton
    triton = None
    tl = None

BLOCK_PAGES = 64  # table columns per program of the block-score kernel


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _block_scores_kernel(
        LSE, BMAX, SC,
        slb, slh, sls,
        smb, smh, smr,
        ssb,
        NS, HR, R, NB, CPP,
        BLOCK_S: tl.constexpr, BLOCK_PG: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        """One program per (row, BLOCK_PG table columns): SC[b, p] = max(SC[b, p], max over the query rows
        (all KV heads) and the CPP key blocks of page p of exp(block max logit − the row's final LSE))."""
        b = tl.program_id(0).to(tl.int64)
        pages = tl.program_id(1) * BLOCK_PG + tl.arange(0, BLOCK_PG)
        pmask = pages < NB
        j = tl.arange(0, BLOCK_J)
        chunks = pages[:, None] * CPP + j[None, :]
        cmask = pmask[:, None] & (j[None, :] < CPP)
        splits = tl.arange(0, BLOCK_S)
        smask = splits < NS
        best = tl.zeros([BLOCK_PG], tl.float32)
        for hr in range(0, HR):
            h = (hr // R).to(tl.int64)
            r = hr % R
            lse_s = tl.load(LSE + b * slb + h * slh + splits * sls + r, mask=smask, other=float("-inf"))
            m = tl.max(lse_s, axis=0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            total = tl.sum(tl.exp(lse_s - m_safe), axis=0)
            x = tl.load(BMAX + b * smb + h * smh + r * smr + chunks, mask=cmask, other=float("-inf"))
            prob = tl.exp(tl.max(x, axis=1) - m_safe) / total
            best = tl.maximum(best, tl.where(total > 0, prob, 0.0))  # a row that sees nothing adds nothing
        old = tl.load(SC + b * ssb + pages, mask=pmask, other=0.0)
        tl.store(SC + b * ssb + pages, tl.maximum(old, best), mask=pmask)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                    query_pos: torch.Tensor, key_pos: torch.Tensor | None = None, window: int = 0, n_kept: int = 0,
                    block_scores: torch.Tensor | None = None, rows_hint: int | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, T, D] (any strides, contiguous last dim); k_pool, v_pool [N, Hkv, P, D] (likewise; P a
    multiple of 64); table [B, nb] int32/int64 page ids (columns a row does not use hold any valid id);
    query_pos [B, T] int32 (-1: padding); key_pos [B, nb·P] int32 or None (logical slot = position);
    window / n_kept as in `decode_attention`; block_scores [B, nb] float32 (contiguous last dim) or None:
    max-accumulated block scores (module docstring); rows_hint: the allocated batch (chooses the split); sinks
    [Hq] or None: attention sinks (block scores stay relative to the keys).
    Returns the attention output as a [B, Hq, T, D] view of a contiguous [B, T, Hq, D] tensor."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    B, Hq, T, D = q.shape
    N, Hkv, P, Dk = k_pool.shape
    nb = table.shape[1]
    S = nb * P
    if v_pool.shape != k_pool.shape or Dk != D or Hkv == 0 or Hq % Hkv or table.shape[0] != B:
        raise ValueError(f"paged_attention: q {tuple(q.shape)}, pools {tuple(k_pool.shape)} / "
                         f"{tuple(v_pool.shape)} and table {tuple(table.shape)} do not fit")
    if P % BLOCK_N:
        raise ValueError(f"paged_attention: the page size {P} must be a multiple of {BLOCK_N}")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("queries, keys and values need a contiguous last dimension")
    if key_pos is not None and tuple(key_pos.shape) != (B, S):
        raise ValueError(f"paged_attention: key_pos must be [{B}, {S}], got {tuple(key_pos.shape)}")
    scores = block_scores is not None
    if scores and (block_scores.dtype != torch.float32 or tuple(block_scores.shape) != (B, nb)
                   or (nb > 1 and block_scores.stride(1) != 1)):
        raise ValueError(f"paged_attention: block_scores must be a float32 [{B}, {nb}] tensor with a contiguous "
                         f"last dimension, got {block_scores.dtype} {tuple(block_scores.shape)}")
    final, lse, bmax, splits = split_kv_attention(q, k_pool, v_pool, query_pos, key_pos, window, n_kept, rows_hint,
                                                  S, table=table, scores=scores, sinks=sinks)
    if scores:
        R = Hq // Hkv * T  # query rows per KV head
        cpp = P // BLOCK_N  # key blocks per page
        _block_scores_kernel[(B, triton.cdiv(nb, BLOCK_PAGES))](
            lse, bmax, block_scores,
            lse.stride(0), lse.stride(1), lse.stride(2),
            bmax.stride(0), bmax.stride(1), bmax.stride(2),
            block_scores.stride(0),
            splits, Hkv * R, R, nb, cpp,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_PG=BLOCK_PAGES, BLOCK_J=triton.next_power_of_2(cpp),
        )
    return final.transpose(1, 2)
