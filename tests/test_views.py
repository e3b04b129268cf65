"""Draft views built on the device (`spec/views.py`) show each query exactly the positions the StreamingLLM,
guided and SnapKV rules give, read from the right pages — checked against a per-row reading of the rules."""

from __future__ import annotations

import random

import pytest
import torch

from magicdec.cache.paged import PagedKVCache
from magicdec.model.attention import AttentionMask
from magicdec.spec.views import draft_view, guided_columns

P = 64


def reference_guided(scores: list[float], first: int, select: int) -> list[int]:
    """Block 0 and the select − 1 best-scored blocks among 1 … first − 1, ties to the more recent."""
    if first <= 0 or select <= 0:
        return []
    cands = sorted(range(1, first), key=lambda c: (scores[c] if c < len(scores) else 0.0, c), reverse=True)
    return [0] + sorted(cands[: select - 1])


def visible(view, positions: torch.Tensor, layer: int = 0, private: int = 0) -> list[list[set[tuple[int, int]]]]:
    """Per row and query: the (page, position) pairs the view lets it see (a SnapKV view's `private` first
    slots, which hold selections, by their slot index)."""
    read = view.read if view.read.dim() == 2 else view.read[layer]
    read_pos = view.read_pos if view.read_pos.dim() == 2 else view.read_pos[layer]
    mask = AttentionMask(1, torch.float32, positions, read_pos.shape[-1], key_pos=read_pos, window=view.window,
                         n_kept=view.sinks)
    pages = read.repeat_interleave(P, -1)
    out = []
    for b in range(positions.shape[0]):
        rows = []
        for t in range(positions.shape[1]):
            if positions[b, t] < 0:
                continue
            idx = mask.allowed[b, t].nonzero().flatten().tolist()
            rows.append({(int(pages[b, i]), int(i) if i < private else int(read_pos[b, i])) for i in idx})
        out.append(rows)
    return out


def expected(table: list[list[int]], ctx: list[int], gammas: list[int], window: int, rule: str, sinks: int = 0,
             kept: list[list[int]] | None = None, slots: list[int] | None = None) -> list[list[set[tuple[int, int]]]]:
    out = []
    for b, (blocks, c, g) in enumerate(zip(table, ctx, gammas)):
        rows = []
        for p in range(c, c + max(g, 1)):
            seen = set()
            for q in range(p + 1):
                inside = q > p - window
                if rule == "streaming" and (q < sinks or inside):
                    seen.add((blocks[q // P], q))
                elif rule == "guided" and (q // P in (kept or [[]])[b] or inside):
                    seen.add((blocks[q // P], q))
                elif rule == "snapkv" and inside:
                    seen.add((blocks[q // P], q))
            if rule == "snapkv":
                assert kept is not None and slots is not None
                seen |= {(kept[b][i // P], i) for i in range(slots[b])}
            rows.append(seen)
        out.append(rows)
    return out


def case(seed: int) -> tuple[list[int], list[int], list[list[int]], torch.Tensor, PagedKVCache]:
    rng = random.Random(seed)
    B = rng.randint(1, 5)
    ctx = [rng.randint(1, 900) for _ in range(B)]
    gammas = [rng.randint(0, 4) for _ in range(B)]
    cache = PagedKVCache(1, 80, 1, P, 8, 1, torch.float32, "cpu")
    pages = list(range(80))
    rng.shuffle(pages)
    table = [[pages.pop() for _ in range(-(-(c + 5) // P))] for c in ctx]
    return ctx, gammas, table, cache.table(table), cache


def positions(ctx: list[int], gammas: list[int]) -> torch.Tensor:
    G = max(max(gammas), 1)
    return torch.tensor([[c + j if j < max(g, 1) else -1 for j in range(G)] for c, g in zip(ctx, gammas)])


def span(ctx: list[int], gammas: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    start = torch.tensor(ctx)
    return start, start + torch.tensor([max(g, 1) - 1 for g in gammas]), max(max(gammas), 1) - 1


@pytest.mark.parametrize("seed", range(12))
def test_streaming_view(seed: int) -> None:
    ctx, gammas, blocks, table, cache = case(seed)
    start, end, s = span(ctx, gammas)
    view = draft_view(cache, table, start, end, s, window=100, sinks=4)
    assert visible(view, positions(ctx, gammas)) == expected(blocks, ctx, gammas, 100, "streaming", sinks=4)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("per_layer", [False, True])
def test_guided_view(seed: int, per_layer: bool) -> None:
    ctx, gammas, blocks, table, cache = case(seed)
    start, end, s = span(ctx, gammas)
    gen = torch.Generator().manual_seed(seed)
    L = 3 if per_layer else 1
    scores = (torch.rand((L, len(ctx), table.shape[1]), generator=gen) * 4).round() / 4  # ties
    select, window = 3, 100
    view = draft_view(cache, table, start, end, s, window=window, select=select,
                      scores=scores if per_layer else scores[0])
    first = [max(c - window + 1, 0) // P for c in ctx]
    for layer in range(L):
        kept = [reference_guided(scores[layer, b].tolist(), first[b], select) for b in range(len(ctx))]
        assert visible(view, positions(ctx, gammas), layer) == expected(blocks, ctx, gammas, window, "guided",
                                                                       kept=kept)


def test_guided_columns_ties_and_short_tables() -> None:
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.1, 0.5, 0.0]])
    assert guided_columns(scores, torch.tensor([5]), 3).tolist() == [[0, 2, 4]]
    assert guided_columns(scores, torch.tensor([0]), 3).tolist() == [[-1, -1, -1]]
    assert guided_columns(scores, torch.tensor([2]), 4).tolist() == [[0, 1, -1, -1]]


@pytest.mark.parametrize("seed", range(8))
def test_snapkv_view(seed: int) -> None:
    ctx, gammas, blocks, table, cache = case(seed)
    start, end, s = span(ctx, gammas)
    rng = random.Random(seed)
    used = {p for row in blocks for p in row}
    spare = [p for p in range(80) if p not in used]
    kept = [[spare.pop(), spare.pop()] for _ in ctx]
    slots = [rng.randint(0, 2 * P) for _ in ctx]
    view = draft_view(cache, table, start, end, s, window=64, kept_pages=torch.tensor(kept),
                      kept_slots=torch.tensor(slots))
    got = visible(view, positions(ctx, gammas), private=2 * P)
    assert got == expected(blocks, ctx, gammas, 64, "snapkv", kept=kept, slots=slots)
