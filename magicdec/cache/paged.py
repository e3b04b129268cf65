"""The paged KV cache: one pool of fixed-size blocks shared by every request, read through block tables.

Buffers are [layers, blocks + 1, kv_heads, block_size, head_dim]; the extra last block is the trash
block that padding tokens write to and no table lists. A request's token at position p lives in block
table[p // block_size] at offset p % block_size, so its logical slots are its positions, as in the dense
cache: masks are by position, rollback is free, and the attention kernels see the same slots in the same
order whichever blocks hold them (the batch-invariant CPU kernel gives the dense cache's numbers bit for
bit). On CUDA, decode-shaped forwards run the Triton split-KV kernel of `magicdec.kernels.paged_attention`,
which reads the pages through the tables itself (no gather, no mask tensor, block scores included); longer
forwards gather the read blocks and run SDPA. Which blocks a request holds is `BlockPool`'s business; this
module only moves tensors.

A forward runs over a `PagedView` (the tables of the forward's rows). The target's view reads each row's
whole table. The StreamingLLM self-draft's view (`PagedView(..., read=…, window=…, sinks=…)`) reads a
table of its own — the first block (the sinks) and the blocks of the recent window — of the same pool:
no copy of the target's KV, no prefill of its own. It writes its draft tokens' keys through the target's
table, at positions past the committed context, where the verification forward overwrites them.

A view may carry a `scores` buffer [B, nb] (float32, zeroed by the caller): every layer's attention then
max-accumulates into it, per row and column of the read table, the largest attention probability that any
query head and token of the row gives to a slot of that block (`cpu_kernels.paged_attention`'s block scores;
without the kernels computed in float64 from the gathered keys); with `score_layers="sum"` each layer's
largest is added instead. The guided self-draft ranks blocks by it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from magicdec.kernels import cpu as cpu_kernels
from magicdec.kernels import paged_attention as triton_paged
from magicdec.kernels.fused import use_triton
from magicdec.model.attention import MAX_DECODE_TOKENS, AttentionMask, attend

if TYPE_CHECKING:
    from magicdec.model.llama import Transformer


class PagedKVCache:
    def __init__(self, n_layers: int, num_blocks: int, n_kv_heads: int, block_size: int, head_dim: int,
                 group: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, num_blocks + 1, n_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.group = num_blocks, block_size, group
        self.trash = num_blocks

    @classmethod
    def for_model(cls, model: Transformer, num_blocks: int, block_size: int) -> PagedKVCache:
        cfg = model.config
        return cls(cfg.n_layers, num_blocks, model.kv_heads, block_size, cfg.head_dim, cfg.group_size, model.dtype,
                   model.device)

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int) -> int:
        cfg = model.config
        return cfg.kv_bytes_per_token(model.dtype.itemsize, model.kv_heads) * block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def table(self, rows: list[list[int]], width: int | None = None) -> torch.Tensor:
        """Block tables [B, width] (long, on the cache's device), short rows padded with the trash block."""
        width = max(width or 0, max((len(r) for r in rows), default=0), 1)
        padded = [r + [self.trash] * (width - len(r)) for r in rows]
        return torch.tensor(padded, dtype=torch.long, device=self.k.device)


class PagedView:
    """One forward's rows: `table` [B, nb] for writes (and reads); for a sparse draft, `read` [B, nr] (the
    blocks it reads, in order), the positions held by its slots `read_pos` [B, nr · block_size] (-1: none),
    the `window` of recent positions a query sees and the `sinks` first slots it always sees (up to its own
    position). `scores` [B, nr] float32 or None: block scores, over the forward's layers their maximum
    (`score_layers="max"`) or their sum ("sum")
    (see the module docstring)."""

    def __init__(self, cache: PagedKVCache, table: torch.Tensor, read: torch.Tensor | None = None,
                 read_pos: torch.Tensor | None = None, window: int = 0, sinks: int = 0,
                 scores: torch.Tensor | None = None, score_layers: str = "max") -> None:
        self.cache, self.table, self.read, self.read_pos = cache, table, read, read_pos
        self.window, self.sinks, self.scores = window, sinks, scores
        if score_layers not in ("max", "sum"):
            raise ValueError(f"score_layers must be 'max' or 'sum', got {score_layers!r}")
        self.score_layers = score_layers

    def begin(self, positions: torch.Tensor) -> PagedStep:
        return PagedStep(self, positions)


class PagedStep:
    def __init__(self, view: PagedView, positions: torch.Tensor) -> None:
        c = view.cache
        P = c.block_size
        self.cache, self.T, self.total_scores = c, positions.shape[1], view.scores
        # each layer's scores go to the view's buffer directly (max over layers) or to a buffer of their own
        # that is added to it after the layer (sum over layers)
        self.scores = view.scores if view.score_layers == "max" or view.scores is None else torch.empty_like(
            view.scores)
        ok = positions >= 0
        cols = torch.where(ok, positions, 0) // P
        if int(cols.max()) >= view.table.shape[1]:
            raise ValueError(f"position {int(positions.max())} is past the blocks allocated to its row")
        self.pages = torch.where(ok, view.table.gather(1, cols), c.trash).reshape(-1)
        self.offsets = torch.where(ok, positions % P, 0).reshape(-1)
        if view.read is None:  # the target: every block of the row, slot = position
            self.read = view.table
            kv_len = int(positions.max()) + 1
            self.mask = AttentionMask(c.group, c.k.dtype, positions, kv_len, rows_hint=positions.shape[0])
        else:  # a sparse draft: its own blocks, tagged with the positions they hold
            self.read = view.read
            assert view.read_pos is not None
            self.mask = AttentionMask(c.group, c.k.dtype, positions, view.read_pos.shape[1], key_pos=view.read_pos,
                                      window=view.window, n_kept=view.sinks, rows_hint=positions.shape[0])
        self.triton = (self.T <= MAX_DECODE_TOKENS and use_triton(c.k)
                       and c.block_size % triton_paged.BLOCK_N == 0)
        self.kernel = self.T <= MAX_DECODE_TOKENS and c.k.shape[-1] % 8 == 0 and cpu_kernels.applies(
            c.k, self.T, max_tokens=MAX_DECODE_TOKENS)

    def _store(self, buf: torch.Tensor, x: torch.Tensor) -> None:
        """x [B, H, T, D] into its pages and offsets (16-bit values as int16 bits: faster on the CPU)."""
        rows = x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])
        if buf.dtype in (torch.bfloat16, torch.float16) and not buf.is_cuda:
            buf, rows = buf.view(torch.int16), rows.view(torch.int16)
        buf[self.pages, :, self.offsets] = rows

    def _gather(self, buf: torch.Tensor, S: int) -> torch.Tensor:
        """The rows' read blocks as dense [B, H, S, D] (the first S logical slots)."""
        B, nb = self.read.shape
        g = buf[self.read.reshape(-1)]  # [B·nb, H, P, D]
        H, P, D = g.shape[1:]
        return g.view(B, nb, H, P, D).permute(0, 2, 1, 3, 4).reshape(B, H, nb * P, D)[:, :, :S]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.scores is None or self.scores is self.total_scores:
            return self._attend(layer, q, k, v)
        assert self.total_scores is not None
        self.scores.zero_()
        out = self._attend(layer, q, k, v)
        self.total_scores += self.scores
        return out

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        K, V = c.k[layer], c.v[layer]
        self._store(K, k)
        self._store(V, v)
        if self.triton:  # CUDA: the paged split-KV kernel reads the pages itself
            qpos, kpos = self.mask.int32_positions()
            return triton_paged.paged_attention(q, K, V, self.read, qpos, kpos, self.mask.window, self.mask.n_kept,
                                                block_scores=self.scores, rows_hint=self.mask.rows_hint)
        if self.kernel:
            allowed = self.mask.allowed
            width = self.read.shape[1] * c.block_size
            if allowed.shape[2] < width:
                allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[2]))
            return cpu_kernels.paged_attention(q, K, V, self.read, allowed, block_scores=self.scores)
        S = self.mask.kv_len
        Kd = self._gather(K, S)
        if self.scores is not None:  # no kernel: the same scores in float64 from the gathered keys
            P = c.block_size
            width = self.read.shape[1] * P
            keys = torch.nn.functional.pad(Kd, (0, 0, 0, width - S))
            allowed = torch.nn.functional.pad(self.mask.allowed, (0, width - S))
            cpu_kernels.block_scores_reference(q, keys, allowed, P, self.scores)
        return attend(q, Kd, self._gather(V, S), self.mask)
