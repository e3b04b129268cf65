"""Runs the decode-shaped forwards (decoding, verification, drafting) of a model, replaying them
as CUDA graphs on CUDA.

A graph is captured per (cache buffers, padded batch, tokens per sequence, logits index or not).
Batches are padded up to a power of two with padding rows (position -1), which write to the
caches' trash slots and attend slot 0 only, so a batch that shrinks as sequences finish reuses a
few graphs. Everything inside a captured forward is device work: the caches' decode-shaped steps
read no value back to the host. Outputs live in the graph's static buffers and are valid until the
next replay of the same graph. Elsewhere (CPU, prefill chunks) the model runs eagerly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.sparse import SparseKVCache
from magicdec.kernels.cpu import MAX_DECODE_TOKENS
from magicdec.model.llama import Transformer

Cache = DenseKVCache | SparseKVCache


@dataclass(slots=True)
class _Graph:
    graph: Any
    ids: torch.Tensor
    pos: torch.Tensor
    index: torch.Tensor | None
    out: torch.Tensor


def _cache_key(cache: Cache) -> tuple:
    """The buffers a captured forward touches (graphs hold raw pointers)."""
    tensors = [t for t in vars(cache).values() if isinstance(t, torch.Tensor)]
    return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)


class ModelRunner:
    def __init__(self, model: Transformer, cuda_graphs: bool | None = None) -> None:
        self.model = model
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda" and os.environ.get("MAGICDEC_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, _Graph] = {}
        self._pool: Any = None
        self.capture_s = 0.0  # time spent capturing graphs, which timings of steady-state decoding exclude

    @property
    def config(self) -> Any:
        return self.model.config

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: Cache,
                 logits_index: torch.Tensor | None = None) -> torch.Tensor:
        B, T = ids.shape
        if not self.cuda_graphs or T > MAX_DECODE_TOKENS:
            return self.model(ids, pos, cache, logits_index)
        g = self._graph(cache, B, T, logits_index is not None)
        rows = g.ids.shape[0]
        g.ids[:B].copy_(ids)
        g.pos[:B].copy_(pos)
        if rows > B:
            g.pos[B:].fill_(-1)
        if g.index is not None:
            assert logits_index is not None
            g.index[:B].copy_(logits_index)
        g.graph.replay()
        return g.out[:B]

    def _graph(self, cache: Cache, B: int, T: int, with_index: bool) -> _Graph:
        capacity = cache.k.shape[1]
        rows = min(1 << (B - 1).bit_length(), capacity)
        key = (_cache_key(cache), rows, T, with_index)
        if key not in self._graphs:
            self._graphs[key] = self._capture(cache, rows, T, with_index)
        return self._graphs[key]

    def _capture(self, cache: Cache, rows: int, T: int, with_index: bool) -> _Graph:
        dev = self.model.device
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        ids = torch.zeros((rows, T), dtype=torch.long, device=dev)
        pos = torch.full((rows, T), -1, dtype=torch.long, device=dev)  # padding: writes go to the trash slot
        index = torch.zeros((rows, 1), dtype=torch.long, device=dev) if with_index else None
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels and settle allocations before capture
                self.model(ids, pos, cache, index)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model(ids, pos, cache, index)
        torch.cuda.synchronize(dev)
        self.capture_s += time.perf_counter() - t0
        return _Graph(graph, ids, pos, index, out)

    def release(self) -> None:
        self._graphs.clear()
        self._pool = None
