"""Graph-shaped forwards (`GraphRunner`): the batch padded to a power of two, block and read tables widened
with columns no query sees, static views. On the CPU `pad=True` runs those padded shapes eagerly: every
row's logits (and a guided view's block scores) must be bitwise those of the unpadded forward, which is
what lets the engine replay CUDA graphs without changing a request's tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from magicdec import LLM
from magicdec.cache.paged import PagedKVCache, PagedView
from magicdec.runtime.graphs import GraphRunner, bucket

P = 64


def _prefilled(llm: LLM, lengths: list[int]) -> tuple[PagedKVCache, list[list[int]], list[list[int]]]:
    """A pool holding each prompt's KV in blocks of its own (not in order: tables are what matter)."""
    model = llm.model
    cache = PagedKVCache.for_model(model, 40, P)
    prompts = random_prompts(len(lengths), lengths, llm.config.vocab_size, seed=5)
    free = list(range(39, -1, -1))
    blocks = []
    for p in prompts:
        mine = [free.pop() for _ in range(-(-(len(p) + 8) // P))]
        blocks.append(mine)
        model(torch.tensor([p]), torch.arange(len(p))[None], PagedView(cache, cache.table([mine])))
    return cache, prompts, blocks


def _inputs(prompts: list[list[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (len(prompts), T), generator=gen)
    pos = torch.tensor([[len(p) + j for j in range(T)] for p in prompts])
    pos[-1, T - 1:] = -1  # a ragged row (γ smaller than the others')
    return ids, pos


@pytest.mark.parametrize("T", [1, 4])
def test_padded_target_forward_is_bitwise_unpadded(tiny_llm: LLM, kernels: None, T: int) -> None:
    cache, prompts, blocks = _prefilled(tiny_llm, [70, 200, 130])
    ids, pos = _inputs(prompts, T)
    table = cache.table(blocks)
    runner = GraphRunner(tiny_llm.model, pad=True)
    k0, v0 = cache.k.clone(), cache.v.clone()
    want = tiny_llm.model(ids, pos, PagedView(cache, table))
    cache.k.copy_(k0)
    cache.v.copy_(v0)
    got = runner(ids, pos, PagedView(cache, table))
    assert bucket(3) == 4 and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("layers", ["max", "layer"])
def test_padded_draft_view_and_block_scores_are_bitwise_unpadded(tiny_llm: LLM, kernels: None, layers: str) -> None:
    """A sparse draft's view (the first block and the recent window's blocks, through a read table of its own),
    with guided block scores."""
    cache, prompts, blocks = _prefilled(tiny_llm, [300, 200, 150])
    ids, pos = _inputs(prompts, 1)
    table = cache.table(blocks)
    window = 96
    reads, tags = [], []
    for p, mine in zip(prompts, blocks):
        first = (len(p) - window + 1) // P
        cols = [0] + list(range(max(first, 1), len(p) // P + 1))
        reads.append([mine[c] for c in cols])
        tags.append(cols)
    width = max(map(len, reads))
    read = cache.table(reads, width)
    base = torch.tensor([c + [-1] * (width - len(c)) for c in tags])
    read_pos = torch.where(base[..., None] >= 0, base[..., None] * P + torch.arange(P), -1).reshape(3, -1)
    L = tiny_llm.config.n_layers
    if layers == "layer":
        read, read_pos = read[None].expand(L, -1, -1).contiguous(), read_pos[None].expand(L, -1, -1).contiguous()
    shape = (L, 3, width) if layers == "layer" else (3, width)
    kw = dict(read=read, read_pos=read_pos, window=window, sinks=P, score_layers=layers)
    k0, v0 = cache.k.clone(), cache.v.clone()
    want_scores = torch.zeros(shape)
    want = tiny_llm.model(ids, pos, PagedView(cache, table, scores=want_scores, **kw))
    cache.k.copy_(k0)
    cache.v.copy_(v0)
    got_scores = torch.full(shape, 7.0)  # the runner overwrites the caller's buffer
    got = GraphRunner(tiny_llm.model, pad=True)(ids, pos, PagedView(cache, table, scores=got_scores, **kw))
    assert torch.equal(got, want)
    assert torch.equal(got_scores, want_scores) and want_scores.max() > 0


def test_prefill_chunks_run_eagerly(tiny_llm: LLM) -> None:
    cache = PagedKVCache.for_model(tiny_llm.model, 4, P)
    runner = GraphRunner(tiny_llm.model, pad=True)
    ids = torch.randint(0, 300, (1, 40))
    runner(ids, torch.arange(40)[None], PagedView(cache, cache.table([[0]])))
    assert not runner._shapes
