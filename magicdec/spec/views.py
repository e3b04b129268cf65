"""A sparse draft's view of the paged cache: which blocks each request's draft reads, built on the device.

The draft reads, through a read table of its own, a subset of the blocks of its pool (the target's, or a
draft model's indexed by the same block tables), each slot tagged with the position it holds:
- StreamingLLM: the first block (its `sinks` first slots always visible) and the blocks of the recent
  window (a query at position p sees positions in (p − window, p]);
- guided: the first block and the `select − 1` best-scored older blocks (whole blocks, always visible up
  to the query) before the window's blocks; the scores are the last verification's block scores, pooled
  over layers ([B, nb]) or per layer ([L, B, nb]: each layer reads its own blocks);
- SnapKV: the request's private blocks of selected keys (their first `kept_slots` slots visible to every
  query), then the window's blocks.
The window starts at the block of position `start − window + 1`, `start` being the earliest position the
forward queries (the committed context when drafting; earlier when a draft with KV of its own catches up),
and ends at the block of the last position the round writes. Every row's columns are computed at once from
tensors: no loop over requests or layers, no read back to the host.
"""

from __future__ import annotations

import torch

from magicdec.cache.paged import PagedKVCache, PagedView


def _window(start: torch.Tensor, end: torch.Tensor, window: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first and last block of its window: positions start − window + 1 … end."""
    first = (start - window + 1).clamp(min=0) // P
    return first, end // P


def guided_columns(scores: torch.Tensor, first: torch.Tensor, select: int) -> torch.Tensor:
    """The kept columns of a guided draft, [..., B, select] ascending, −1 (last) where none: block 0 (the
    sinks) and the `select − 1` best-scored blocks among 1 … first − 1 (older than the window, which starts at
    block `first`), ties to the more recent; nothing when the window starts at block 0. `scores` [..., B, nb]."""
    nb, k = scores.shape[-1], select - 1
    cols = torch.arange(nb, device=scores.device)
    eligible = ((cols >= 1) & (cols < first[:, None])).expand_as(scores)  # [..., B, nb]
    # most recent first, then a stable sort by score: equal scores keep the more recent column first
    keyed = scores.flip(-1).masked_fill(~eligible.flip(-1), -1.0)
    best = nb - 1 - keyed.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    best = torch.where(eligible.gather(-1, best), best, -1)
    if best.shape[-1] < k:
        best = torch.nn.functional.pad(best, (0, k - best.shape[-1]), value=-1)
    zero = torch.where(first > 0, 0, -1)[:, None].expand(*best.shape[:-1], 1)
    kept = torch.cat([zero, best], -1)
    ascending = torch.where(kept >= 0, kept, nb).sort(dim=-1).values
    return torch.where(ascending < nb, ascending, -1)


def draft_view(pool: PagedKVCache, table: torch.Tensor, start: torch.Tensor, end: torch.Tensor, span: int, *,
               window: int, sinks: int = 0, select: int = 0, scores: torch.Tensor | None = None,
               kept_pages: torch.Tensor | None = None, kept_slots: torch.Tensor | None = None) -> PagedView:
    """The view of a draft over `pool` for rows with block tables `table` [B, nb] whose forward queries
    positions `start` … `end` [B], `span` ≥ every end − start (a host number: the view's width depends on it
    alone, never on a value read back from the device; see the module docstring). Guided: `select` kept
    blocks ranked by `scores` ([B, nb] or per layer [L, B, nb]); SnapKV: `kept_pages` [B, nk] private pages
    whose first `kept_slots` [B] slots hold the selection."""
    P, dev = pool.block_size, table.device
    B, nb = table.shape
    first, last = _window(start, end, window, P)
    n_win = (window + span - 1) // P + 2  # blocks the window spans, at most
    win = first[:, None] + torch.arange(n_win, device=dev)  # [B, n_win]
    win = torch.where(win <= last[:, None], win, -1)
    if select:  # guided: `select` columns of kept blocks, then the window's
        assert scores is not None
        kept = guided_columns(scores, first, select)  # [B, select] or [L, B, select]
        cols = torch.cat([kept, win.expand(*kept.shape[:-1], -1)], -1)
        n_kept = select * P
    elif kept_pages is not None:  # SnapKV: its private blocks, then the window's
        cols = torch.cat([torch.full((B, kept_pages.shape[1]), -1, device=dev), win], -1)
        n_kept = kept_pages.shape[1] * P
    else:  # StreamingLLM: the first block (when the window has left it), then the window's; the sinks are
        # the view's first slots either way
        lead = ((first > 0) & (sinks > 0))[:, None]
        none = torch.full_like(win[:, :1], -1)
        cols = torch.where(lead, torch.cat([none + 1, win], -1), torch.cat([win, none], -1))
        n_kept = sinks
    pages = table.expand(*cols.shape[:-1], nb).gather(-1, cols.clamp(0, nb - 1))
    read = torch.where(cols >= 0, pages, pool.trash)
    offs = torch.arange(P, device=dev)
    read_pos = torch.where(cols[..., None] >= 0, cols[..., None] * P + offs, -1).flatten(-2)
    if kept_pages is not None:  # SnapKV's selected slots: visible to every query (they precede the window)
        assert kept_slots is not None
        nk = kept_pages.shape[1]
        read[:, :nk] = kept_pages
        slot = torch.arange(nk * P, device=dev)
        read_pos[:, : nk * P] = torch.where(slot < kept_slots[:, None], 0, -1)
    return PagedView(pool, table, read=read, read_pos=read_pos, window=window, sinks=n_kept)
