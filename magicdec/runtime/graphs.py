"""Decode-shaped forwards over the paged cache at a few fixed shapes, replayed as CUDA graphs on CUDA.

The engine's decode, verification and draft forwards (T ≤ MAX_DECODE_TOKENS tokens per request) change
shape every step: the number of decoding requests, the longest block table, a draft's read table. A
graph is captured per padded shape instead: the batch rounded up to a power of two (padding rows sit at
position −1: they write to the trash block and read slot 0 only), the block table to a power of two of
columns (extra columns name the trash block, past every row's position, so no query sees them), a
sparse draft's read table likewise (extra columns hold no position). The view's tensors are copied into
the graph's static buffers before a replay; the logits (and a guided view's block scores) are copied out
after. Padding changes no row's visibility, so on the CPU a padded forward gives a request the tokens
an unpadded one gives (the kernels are batch-invariant; `tests/test_graphs.py` checks it with
`GraphRunner(model, pad=True)`, which pads without capturing). Prefill chunks run eagerly.

Inside a captured forward everything is device work: a static view (`PagedView(static=True)`) makes the
cache's step read no value back to the host (its key length is the table's width).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from magicdec.cache.paged import PagedView
from magicdec.kernels.cpu import MAX_DECODE_TOKENS
from magicdec.model.llama import Transformer


def bucket(n: int) -> int:
    """The padded size of `n` rows or columns: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True, slots=True)
class Shape:
    """What a captured graph is specialised to."""

    pool: int  # the pool's buffer (graphs hold raw pointers)
    rows: int
    T: int
    width: int  # block-table columns
    read: tuple[int, ...] | None  # a sparse view's read table: (columns,) shared, (layers, columns) per layer
    window: int
    sinks: int
    index: bool
    scores: str | None  # a guided view's score pooling, or None


@dataclass(slots=True)
class _Buffers:
    """A padded forward's inputs and outputs (static on CUDA: a graph reads and writes these)."""

    ids: torch.Tensor
    pos: torch.Tensor
    view: PagedView
    index: torch.Tensor | None
    out: torch.Tensor | None = None
    graph: Any = None


class GraphRunner:
    """Runs `model` over paged views: decode-shaped forwards padded to a captured shape (CUDA graphs on
    CUDA, or `pad=True` to pad without graphs), the rest eagerly."""

    def __init__(self, model: Transformer, cuda_graphs: bool | None = None, pad: bool = False) -> None:
        if cuda_graphs is None:  # a mixture of experts picks its experts on the host: not capturable
            cuda_graphs = (model.device.type == "cuda" and os.environ.get("MAGICDEC_CUDA_GRAPHS", "1") != "0"
                           and not model.config.n_experts)
        self.model, self.cuda_graphs, self.pad = model, cuda_graphs, pad or cuda_graphs
        self._shapes: dict[Shape, _Buffers] = {}
        self._pool: Any = None
        self.capture_s = 0.0  # time spent capturing graphs (a one-time cost that step timings report apart)

    @property
    def config(self) -> Any:
        return self.model.config

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, view: PagedView,
                 logits_index: torch.Tensor | None = None) -> torch.Tensor:
        B, T = ids.shape
        if not self.pad or T > MAX_DECODE_TOKENS:
            return self.model(ids, pos, view, logits_index)
        shape = self._shape(view, B, T, logits_index is not None)
        buf = self._shapes.get(shape)
        if buf is None:
            buf = self._shapes[shape] = self._buffers(view, shape)
        self._fill(buf, ids, pos, view, logits_index)
        if self.cuda_graphs:
            if buf.graph is None:
                self._capture(buf)
            buf.graph.replay()
        else:
            buf.out = self.model(buf.ids, buf.pos, buf.view, buf.index)
        assert buf.out is not None
        if view.scores is not None:  # the guided view's block scores, back into the caller's buffer
            cols = view.scores.shape[-1]
            view.scores.copy_(buf.view.scores[..., :B, :cols] if view.scores.dim() == 3
                              else buf.view.scores[:B, :cols])
        return buf.out[:B]

    def _shape(self, view: PagedView, B: int, T: int, index: bool) -> Shape:
        rows, width = bucket(B), bucket(view.table.shape[1])
        read = None
        if view.read is not None:
            read = (*view.read.shape[:-2], bucket(view.read.shape[-1]))
        scores = view.score_layers if view.scores is not None else None
        return Shape(view.cache.k.data_ptr(), rows, T, width, read, view.window, view.sinks, index, scores)

    def _buffers(self, view: PagedView, s: Shape) -> _Buffers:
        dev, cache = self.model.device, view.cache
        P = cache.block_size
        ids = torch.zeros((s.rows, s.T), dtype=torch.long, device=dev)
        pos = torch.full((s.rows, s.T), -1, dtype=torch.long, device=dev)  # padding: writes go to the trash block
        table = torch.full((s.rows, s.width), cache.trash, dtype=torch.long, device=dev)
        read = read_pos = scores = None
        if s.read is not None:
            lead = s.read[:-1]
            read = torch.full((*lead, s.rows, s.read[-1]), cache.trash, dtype=torch.long, device=dev)
            read_pos = torch.full((*lead, s.rows, s.read[-1] * P), -1, dtype=torch.long, device=dev)
        if s.scores is not None:
            cols = s.read[-1] if s.read is not None else s.width
            lead = (cache.n_layers,) if s.scores == "layer" else ()
            scores = torch.zeros((*lead, s.rows, cols), dtype=torch.float32, device=dev)
        padded = PagedView(cache, table, read=read, read_pos=read_pos, window=s.window, sinks=s.sinks,
                           scores=scores, score_layers=s.scores or "max", static=True)
        index = torch.zeros((s.rows, 1), dtype=torch.long, device=dev) if s.index else None
        return _Buffers(ids, pos, padded, index)

    @staticmethod
    def _fill(buf: _Buffers, ids: torch.Tensor, pos: torch.Tensor, view: PagedView,
              logits_index: torch.Tensor | None) -> None:
        """Copy one forward's inputs into the padded buffers (padding rows and columns stay padding)."""
        B = ids.shape[0]
        v = buf.view
        buf.ids[:B].copy_(ids)
        buf.pos[:B].copy_(pos)
        buf.pos[B:].fill_(-1)
        v.table.fill_(v.cache.trash)
        v.table[:B, : view.table.shape[1]].copy_(view.table)
        if view.read is not None:
            assert v.read is not None and v.read_pos is not None and view.read_pos is not None
            nr = view.read.shape[-1]
            v.read.fill_(v.cache.trash)
            v.read[..., :B, :nr].copy_(view.read)
            v.read_pos.fill_(-1)
            v.read_pos[..., :B, : view.read_pos.shape[-1]].copy_(view.read_pos)
        if v.scores is not None:
            v.scores.zero_()
        if buf.index is not None:
            assert logits_index is not None
            buf.index[:B].copy_(logits_index)

    def _capture(self, buf: _Buffers) -> None:
        dev = self.model.device
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels and settle allocations before capture
                self.model(buf.ids, buf.pos, buf.view, buf.index)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            buf.out = self.model(buf.ids, buf.pos, buf.view, buf.index)
        torch.cuda.synchronize(dev)
        buf.graph = graph
        self.capture_s += time.perf_counter() - t0

    def release(self) -> None:
        """Drop every captured graph and its buffers (e.g. before the pool is reallocated)."""
        self._shapes.clear()
        self._pool = None
