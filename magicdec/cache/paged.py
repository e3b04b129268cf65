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
largest is added instead; with `score_layers="layer"` the buffer is [layers, B, nb] and each layer's scores
stay its own. The guided self-draft ranks blocks by it. Its per-layer variant reads, at each layer, that
layer's best blocks: its view then holds one read table and one set of slot positions per layer
([L, B, nr], [L, B, nr · P]); each layer's attention reads through its own (the visibility of every layer is
computed in one go, over the layers' rows stacked).

Sliding layers' blocks are released on a model whose layers split into groups of equal size
(`magicdec.config.layer_groups`: its global layers, then each window's layers in groups as large), when the
cache is made `grouped`. A block then holds one group's layers (buffers [layers per group, blocks + 1, …]) and
belongs to one group at a time: the row's table gives the global group's blocks, and `rings` maps each of
those blocks, per sliding group, to that group's block for the same columns — a request's ring of a few
blocks that its columns cycle through (the scheduler sizes it so that a block is reused only when no query
can see it any more). Each sliding layer reads and writes through its group's table (`rings[g][table]`,
gathered on the device, so a CUDA graph replays the current map); its window masks the columns whose ring
block holds newer keys, so every kernel sees the same visible slots as without release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from magicdec.config import layer_groups
from magicdec.kernels import cpu as cpu_kernels
from magicdec.kernels import paged_attention as triton_paged
from magicdec.kernels.fused import use_triton
from magicdec.model.attention import MAX_DECODE_TOKENS, AttentionMask, attend

if TYPE_CHECKING:
    from magicdec.model.llama import Transformer

SCORE_LAYERS = ("max", "sum", "layer")  # block scores over a forward's layers: their max, their sum, or each


class PagedKVCache:
    def __init__(self, n_layers: int, num_blocks: int, n_kv_heads: int, block_size: int, head_dim: int,
                 group: int, dtype: torch.dtype, device: torch.device | str,
                 groups: list[list[int]] | None = None) -> None:
        per_block = len(groups[0]) if groups else n_layers
        shape = (per_block, num_blocks + 1, n_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.group, self.n_layers = num_blocks, block_size, group, n_layers
        self.trash = num_blocks
        self.windows: tuple[int, ...] = (0,) * n_layers  # each layer's sliding window (0: global)
        self.softcap = 0.0  # attention-logit soft-capping (Gemma 2)
        # each layer's group (0: read through the row's table) and its index in a block's layers
        self.layer_group, self.layer_slot = [0] * n_layers, list(range(n_layers))
        for g, layers in enumerate(groups or []):
            for j, layer in enumerate(layers):
                self.layer_group[layer], self.layer_slot[layer] = g, j
        self.n_groups = len(groups) if groups else 1
        # per sliding group, block of the row's table → the group's block for the same columns (its ring)
        self.rings = torch.full((self.n_groups - 1, num_blocks + 1), num_blocks, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model: Transformer, num_blocks: int, block_size: int, grouped: bool = False) -> PagedKVCache:
        """`grouped`: the layers in `layer_groups` (sliding layers' blocks in rings, see the module docstring)."""
        cfg = model.config
        groups = layer_groups(cfg.layer_windows) if grouped else None
        cache = cls(cfg.n_layers, num_blocks, model.kv_heads, block_size, cfg.head_dim, cfg.group_size, model.dtype,
                    model.device, groups)
        cache.windows, cache.softcap = cfg.layer_windows, cfg.attn_softcap
        return cache

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int, grouped: bool = False) -> int:
        cfg = model.config
        groups = layer_groups(cfg.layer_windows) if grouped else None
        layers = len(groups[0]) if groups else cfg.n_layers
        return cfg.kv_bytes_per_token(model.dtype.itemsize, model.kv_heads) * layers // cfg.n_layers * block_size

    def map_rings(self, updates: list[tuple[int, int, int]]) -> None:
        """(sliding group ≥ 1, block of a row's table, the group's block for its columns) into the ring maps."""
        if updates:  # the last word on each block (a block freed and handed out again in one step)
            last = {(g, b): ring for g, b, ring in updates}
            rows = [(g, b, ring) for (g, b), ring in last.items()]
            g, b, ring = torch.tensor(rows, dtype=torch.long, device=self.rings.device).unbind(1)
            self.rings[g - 1, b] = ring

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`'s K and V buffers [blocks + 1, kv_heads, block_size, head_dim]."""
        j = self.layer_slot[layer]
        return self.k[j], self.v[j]

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
    position). A per-layer draft (the guided draft with per-layer scores) gives `read` [L, B, nr] and
    `read_pos` [L, B, nr · block_size] instead: layer l reads `read[l]`; a shared view is the case of one
    table for every layer. `scores` float32 or None: block scores over the read table's columns, [B, nb]
    over the forward's layers their maximum (`score_layers="max"`) or their sum ("sum"), or [L, B, nb] per
    layer ("layer") (see the module docstring). `static`: a view of fixed shape (a CUDA graph's buffers): its
    step reads nothing back to the host (the target's key length is the table's width, and positions are
    not checked against the table)."""

    def __init__(self, cache: PagedKVCache, table: torch.Tensor, read: torch.Tensor | None = None,
                 read_pos: torch.Tensor | None = None, window: int = 0, sinks: int = 0,
                 scores: torch.Tensor | None = None, score_layers: str = "max", static: bool = False) -> None:
        self.cache, self.table, self.read, self.read_pos, self.static = cache, table, read, read_pos, static
        self.window, self.sinks, self.scores = window, sinks, scores
        if score_layers not in SCORE_LAYERS:
            raise ValueError(f"score_layers must be one of {SCORE_LAYERS}, got {score_layers!r}")
        if scores is not None and scores.dim() != (3 if score_layers == "layer" else 2):
            raise ValueError(f"scores must be [layers, B, nb] with score_layers='layer', else [B, nb]; got "
                             f"{tuple(scores.shape)} with {score_layers!r}")
        if read is not None:
            if read_pos is None or read.dim() not in (2, 3) or read_pos.dim() != read.dim() or (
                    read_pos.shape[:-1] != read.shape[:-1]) or read_pos.shape[-1] != read.shape[-1] * cache.block_size:
                raise ValueError(f"a sparse view needs read [B, nr] and read_pos [B, nr·P], or per layer [L, B, nr] "
                                 f"and [L, B, nr·P]; got {None if read is None else tuple(read.shape)} and "
                                 f"{None if read_pos is None else tuple(read_pos.shape)}")
        self.score_layers = score_layers

    @property
    def per_layer(self) -> bool:
        return self.read is not None and self.read.dim() == 3

    def begin(self, positions: torch.Tensor) -> PagedStep:
        return PagedStep(self, positions)


class PagedStep:
    def __init__(self, view: PagedView, positions: torch.Tensor) -> None:
        c = view.cache
        P = c.block_size
        self.cache, self.T, self.total_scores, self.mode = c, positions.shape[1], view.scores, view.score_layers
        # "sum": each layer's scores go to a buffer of their own, added to the view's after the layer
        self.layer_buf = torch.empty_like(view.scores) if view.scores is not None and self.mode == "sum" else None
        ok = positions >= 0
        cols = torch.where(ok, positions, 0) // P
        top = -1 if view.static else int(positions.max())  # one read back to the host (none for a static view)
        if not view.static and max(top, 0) // P >= view.table.shape[1]:
            raise ValueError(f"position {top} is past the blocks allocated to its row")
        self.pages = torch.where(ok, view.table.gather(1, cols), c.trash).reshape(-1)
        self.offsets = torch.where(ok, positions % P, 0).reshape(-1)
        B = positions.shape[0]
        self.B, self.positions, self.table = B, positions, view.table
        kv_len = view.table.shape[1] * P if view.static else top + 1
        self.full_len, self.sparse = kv_len, view.read is not None
        self._windowed: dict[int, tuple[AttentionMask, torch.Tensor | None]] = {}
        self._groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if view.read is None:  # the target: every block of the row, slot = position
            self.read = view.table[None]
            self.mask = AttentionMask(c.group, c.k.dtype, positions, kv_len, rows_hint=B)
        else:  # a sparse draft: its own blocks, tagged with the positions they hold (one table, or one per layer)
            assert view.read_pos is not None
            self.read = view.read if view.per_layer else view.read[None]
            L = self.read.shape[0]
            # every layer's rows stacked [L·B, …]: one mask computation for all layers, sliced per layer
            qpos = positions if L == 1 else positions.repeat(L, 1)
            self.mask = AttentionMask(c.group, c.k.dtype, qpos, view.read_pos.shape[-1],
                                      key_pos=view.read_pos.reshape(L * B, -1), window=view.window,
                                      n_kept=view.sinks, rows_hint=B)
        self.shared = self.read.shape[0] == 1  # one read table for every layer
        self._masks: list[AttentionMask | None] = [None] * self.read.shape[0]
        self._padded: torch.Tensor | None = None
        self.triton = (self.T <= MAX_DECODE_TOKENS and use_triton(c.k)
                       and c.block_size % triton_paged.BLOCK_N == 0)
        self.kernel = self.T <= MAX_DECODE_TOKENS and c.k.shape[-1] % 8 == 0 and cpu_kernels.applies(
            c.k, self.T, max_tokens=MAX_DECODE_TOKENS)

    def _store(self, buf: torch.Tensor, x: torch.Tensor, pages: torch.Tensor) -> None:
        """x [B, H, T, D] into its pages and offsets (16-bit values as int16 bits: faster on the CPU)."""
        rows = x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])
        if buf.dtype in (torch.bfloat16, torch.float16) and not buf.is_cuda:
            buf, rows = buf.view(torch.int16), rows.view(torch.int16)
        buf[pages, :, self.offsets] = rows

    def group_of(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`layer`'s K and V buffers, the table it reads the row's whole context through and the pages its
        tokens go to: the row's own, or for a sliding group's layer the same columns of its ring (the cache's
        ring map, read on the device: a CUDA graph replays it too)."""
        K, V = self.cache.layer_kv(layer)
        g = self.cache.layer_group[layer]
        if not g:
            return K, V, self.table, self.pages
        if g not in self._groups:
            ring = self.cache.rings[g - 1]
            self._groups[g] = (ring[self.table], ring[self.pages])
        table, pages = self._groups[g]
        return K, V, table, pages

    def _gather(self, buf: torch.Tensor, S: int, read: torch.Tensor | None = None) -> torch.Tensor:
        """The rows' read blocks `read` [B, nr] (default: the shared read table) as dense [B, H, S, D] (the
        first S logical slots)."""
        read = self.read[0] if read is None else read
        B, nb = read.shape
        g = buf[read.reshape(-1)]  # [B·nb, H, P, D]
        H, P, D = g.shape[1:]
        return g.view(B, nb, H, P, D).permute(0, 2, 1, 3, 4).reshape(B, H, nb * P, D)[:, :, :S]

    def _rows(self, layer: int) -> slice:
        """The rows of the stacked mask that `layer` reads through (all of them for a shared view)."""
        if self.shared:
            return slice(None)
        return slice(layer * self.B, (layer + 1) * self.B)

    def _layer_mask(self, layer: int) -> AttentionMask:
        """`layer`'s mask: the shared one, or its slice of the stacked one (visibility computed once)."""
        if self.shared:
            return self.mask
        m = self._masks[layer]
        if m is None:
            rows = self._rows(layer)
            m = AttentionMask(self.mask.group, self.mask.dtype, self.positions, self.mask.kv_len,
                              key_pos=self.mask.key_pos[rows], window=self.mask.window, n_kept=self.mask.n_kept,
                              allowed=self.mask.allowed[rows], rows_hint=self.B)
            self._masks[layer] = m
        return m

    def _kernel_allowed(self, layer: int) -> torch.Tensor:
        """`layer`'s visibility [B, T, nr·P] for the CPU kernel (padded once to the read table's width)."""
        if self._padded is None:
            allowed = self.mask.allowed
            width = self.read.shape[2] * self.cache.block_size
            if allowed.shape[2] < width:
                allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[2]))
            self._padded = allowed
        return self._padded[self._rows(layer)]

    def window_mask(self, window: int) -> AttentionMask:
        """The target's visibility through the row's whole table with a sliding `window` (0: none): how a
        sliding layer is read, by the target and by every draft alike."""
        if window not in self._windowed:
            self._windowed[window] = (AttentionMask(self.cache.group, self.cache.k.dtype, self.positions,
                                                    self.full_len, window=window, rows_hint=self.B), None)
        return self._windowed[window][0]

    def _window_allowed(self, window: int) -> torch.Tensor:
        mask, padded = self._windowed[window]
        if padded is None:
            padded = mask.allowed
            width = self.table.shape[1] * self.cache.block_size
            if padded.shape[2] < width:
                padded = torch.nn.functional.pad(padded, (0, width - padded.shape[2]))
            self._windowed[window] = (mask, padded)
        return padded

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        window = self.cache.windows[layer]
        if window:  # a sliding layer reads the target's blocks, as the target does; its scores rank nothing
            return self._attend_windowed(layer, q, k, v, None, window, sinks)
        attend_fn = self._attend_windowed if self.cache.softcap else self._attend
        if self.total_scores is None or self.mode == "max":
            return attend_fn(layer, q, k, v, self.total_scores, sinks=sinks)
        if self.mode == "layer":
            return attend_fn(layer, q, k, v, self.total_scores[layer], sinks=sinks)
        assert self.layer_buf is not None
        self.layer_buf.zero_()
        out = attend_fn(layer, q, k, v, self.layer_buf, sinks=sinks)
        self.total_scores += self.layer_buf
        return out

    def _attend_windowed(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scores: torch.Tensor | None, window: int = 0,
                         sinks: torch.Tensor | None = None) -> torch.Tensor:
        """A sliding layer (or any layer of a soft-capped model): the row's whole table, as the target reads it,
        with the layer's window. Soft-capping runs the PyTorch path (no kernel has it)."""
        c = self.cache
        K, V, table, pages = self.group_of(layer)
        self._store(K, k, pages)
        self._store(V, v, pages)
        if self.sparse and not window:  # a sparse draft's global layer of a soft-capped model
            read, mask = self.read[0 if self.shared else layer], self._layer_mask(layer)
        else:
            read, mask = table, self.window_mask(window)
        if not c.softcap and self.triton:
            qpos, _ = mask.int32_positions()
            return triton_paged.paged_attention(q, K, V, read, qpos[: self.B], None, window, 0,
                                                block_scores=scores, rows_hint=mask.rows_hint, sinks=sinks)
        if not c.softcap and self.kernel:
            return cpu_kernels.paged_attention(q, K, V, read, self._window_allowed(window), block_scores=scores,
                                               sinks=sinks)
        S = mask.kv_len
        Kd = self._gather(K, S, read)
        if scores is not None:
            P = c.block_size
            width = read.shape[1] * P
            keys = torch.nn.functional.pad(Kd, (0, 0, 0, width - S))
            allowed = torch.nn.functional.pad(mask.allowed, (0, width - S))
            cpu_kernels.block_scores_reference(q, keys, allowed, P, scores)
        return attend(q, Kd, self._gather(V, S, read), mask, softcap=c.softcap, sinks=sinks)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scores: torch.Tensor | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cache
        K, V, _, pages = self.group_of(layer)
        self._store(K, k, pages)
        self._store(V, v, pages)
        read = self.read[0 if self.shared else layer]
        if self.triton:  # CUDA: the paged split-KV kernel reads the pages itself
            qpos, kpos = self.mask.int32_positions()
            rows = self._rows(layer)
            return triton_paged.paged_attention(q, K, V, read, qpos[: self.B], None if kpos is None else kpos[rows],
                                                self.mask.window, self.mask.n_kept, block_scores=scores,
                                                rows_hint=self.mask.rows_hint, sinks=sinks)
        if self.kernel:
            return cpu_kernels.paged_attention(q, K, V, read, self._kernel_allowed(layer), block_scores=scores,
                                               sinks=sinks)
        mask = self._layer_mask(layer)
        S = mask.kv_len
        Kd = self._gather(K, S, read)
        if scores is not None:  # no kernel: the same scores in float64 from the gathered keys
            P = c.block_size
            width = read.shape[1] * P
            keys = torch.nn.functional.pad(Kd, (0, 0, 0, width - S))
            allowed = torch.nn.functional.pad(mask.allowed, (0, width - S))
            cpu_kernels.block_scores_reference(q, keys, allowed, P, scores)
        return attend(q, Kd, self._gather(V, S, read), mask)
