"""Attention over a KV cache with grouped-query heads.

`attend(q, k, v, mask)` computes softmax(q kᵀ/√d + mask) v for queries [B, Hq, T, D] against the
keys and values [B, Hkv, S, D] that a cache hands over. The cache describes visibility once per
forward with an `AttentionMask`: by positions (each query's position, each key's position — its slot
index, or a tag — an optional sliding window and a number of always-visible "kept" slots), or by an
explicit [B, T, S] matrix when the rule is irregular.

Backends, chosen per call:
- decode-shaped blocks (T ≤ MAX_DECODE_TOKENS) on CUDA: the Triton split-KV kernel, which reads
  positions directly (no mask tensor, no host synchronisation, CUDA-graph safe), takes strided
  queries and writes the [B, T, Hq, D] layout the output projection reads;
- decode-shaped blocks on the CPU (float32, bfloat16, float16): the batch-invariant AVX2 kernel of
  `magicdec.kernels.cpu`, reading each KV head once for all its query rows;
- everything else: PyTorch SDPA, with the g query heads of a KV head folded into the query rows for
  short blocks (each KV head read once) and SDPA's own GQA for long ones (a smaller mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from magicdec.kernels import cpu as cpu_kernels
from magicdec.kernels import decode_attention as triton_decode
from magicdec.kernels.cpu import MAX_DECODE_TOKENS
from magicdec.kernels.fused import use_triton

# Query rows (T × g) up to which GQA heads are folded into rows for SDPA. Decode/verify/draft blocks are
# far below it; prefill chunks far above. Folding reads each KV head once for all its query rows.
FOLD_MAX_ROWS = 64


class AttentionMask:
    """Which of S key slots each of T queries per sequence may see."""

    __slots__ = ("group", "dtype", "query_pos", "key_pos", "window", "n_kept", "kv_len", "rows_hint", "_allowed",
                 "_sdpa", "_pos32")

    def __init__(
        self,
        group: int,
        dtype: torch.dtype,
        query_pos: torch.Tensor,
        kv_len: int,
        key_pos: torch.Tensor | None = None,
        window: int = 0,
        n_kept: int = 0,
        allowed: torch.Tensor | None = None,
        rows_hint: int | None = None,
    ) -> None:
        """By positions: query_pos [B, T] (-1 = padding, which sees slot 0 only), key_pos [B, S] or
        None (a key's position is its slot index), window (0 = none) exempting the first n_kept slots.
        Or explicitly: `allowed` [B, T, S] bool. `rows_hint`: the cache's allocated batch (for kernels
        whose work split should not change as the batch shrinks)."""
        self.group, self.dtype, self.query_pos, self.kv_len = group, dtype, query_pos, kv_len
        self.key_pos, self.window, self.n_kept, self.rows_hint = key_pos, window, n_kept, rows_hint
        self._allowed, self._sdpa, self._pos32 = allowed, None, None

    def int32_positions(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query and key positions as int32, converted once per forward for the kernel."""
        if self._pos32 is None:
            kp = None if self.key_pos is None else self.key_pos.to(torch.int32)
            self._pos32 = (self.query_pos.to(torch.int32), kp)
        return self._pos32

    @property
    def positional(self) -> bool:
        return self._allowed is None

    @property
    def allowed(self) -> torch.Tensor:
        if self._allowed is None:
            q = self.query_pos.clamp(min=0)[..., None]
            slot = torch.arange(self.kv_len, device=q.device)
            k = slot if self.key_pos is None else self.key_pos[:, None, :]
            vis = (k >= 0) & (k <= q)
            if self.window:
                vis &= (slot < self.n_kept) | (k > q - self.window)
            self._allowed = torch.where((self.query_pos >= 0)[..., None], vis, slot == 0)
        return self._allowed

    def sdpa_mask(self, folded: bool) -> torch.Tensor:
        """The mask SDPA takes: additive (0/-inf) over the folded GQA rows [B, 1, g·T, S], or
        boolean [B, 1, T, S]."""
        if self._sdpa is None:
            allowed = self.allowed
            B, T, S = allowed.shape
            if folded:
                rows = allowed[:, None, None].expand(B, 1, self.group, T, S).reshape(B, 1, self.group * T, S)
                self._sdpa = torch.zeros(rows.shape, dtype=self.dtype, device=allowed.device)
                self._sdpa.masked_fill_(~rows, float("-inf"))
            else:
                self._sdpa = allowed[:, None]
        return self._sdpa


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
           softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, T, D]; k, v [B, Hkv, S, D] → [B, Hq, T, D]. Every query row must see ≥ 1 slot.
    `softcap` > 0: logits → softcap·tanh(logits / softcap) before the mask (Gemma 2), in PyTorch. `sinks` [Hq]:
    attention sinks (GPT-OSS), in the decode kernels (Triton, CPU), else in PyTorch."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    triton = T <= MAX_DECODE_TOKENS and mask.positional and use_triton(q)
    decode_kernel = T <= MAX_DECODE_TOKENS and D % 8 == 0 and cpu_kernels.applies(q, T, max_tokens=MAX_DECODE_TOKENS)
    if softcap or (sinks is not None and not (decode_kernel or triton)):
        return cpu_kernels.attention_with_sinks(q, k, v, mask.allowed, sinks, softcap)
    if triton:
        qpos, kpos = mask.int32_positions()
        return triton_decode.decode_attention(q, k, v, qpos, kpos, mask.window, mask.n_kept, mask.rows_hint, sinks)
    if decode_kernel:
        return cpu_kernels.attention(q, k, v, mask.allowed, sinks)
    if T * (Hq // Hkv) <= FOLD_MAX_ROWS:
        qf = q.reshape(B, Hkv, (Hq // Hkv) * T, D)
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask.sdpa_mask(folded=True))
        return out.view(B, Hq, T, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.sdpa_mask(folded=False), enable_gqa=Hq != Hkv)
