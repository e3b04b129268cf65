"""SnapKV-style selection of the prompt positions a draft keeps.

The prompt's last `observe` queries vote, per layer and KV head, for the positions they attend to
most (attention weights summed over the observation queries and over the query heads of each KV
group, then smoothed by a 1-D pooling so neighbours of strong positions come along). The top
positions outside the recent window are kept; the window itself slides during decoding.

Over the engine's paged cache (`select_paged`), one request at a time when its prompt is in: the votes come
from a read-only forward of its last `observe` prompt tokens over its blocks (the cache already holds those
tokens' keys, so nothing the target later decodes from changes), then each layer's
and KV head's selected keys and values are copied into blocks of the pool that the request holds privately
(its `kept` blocks; slot j of them holds, per layer and head, the j-th selected position). The draft's
view reads those blocks (always visible) and the recent window of the request's own blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from magicdec.cache.paged import PagedKVCache, PagedStep, PagedView
from magicdec.model.attention import AttentionMask, attend
from magicdec.model.llama import Transformer


def pooled_votes(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, voting: torch.Tensor,
                 kernel: int) -> torch.Tensor:
    """Votes [B, Hkv, S] of queries q [B, Hq, T, D] over keys k [B, Hkv, S, D] (`allowed` [B, T, S]): the
    attention weights of the `voting` [B, T] queries, summed over them and over each KV group's query heads,
    smoothed by an average pool of width `kernel`."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, (Hq // Hkv) * T, D)
    scores = (qg @ k.transpose(-1, -2)) * D**-0.5  # [B, Hkv, g*T, S]
    allowed = allowed[:, None].repeat(1, 1, Hq // Hkv, 1).reshape(B, 1, -1, k.shape[2])
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    probs = probs * voting.repeat(1, Hq // Hkv)[:, None, :, None]  # padding queries do not vote
    v = probs.sum(2)  # [B, Hkv, S]
    return F.avg_pool1d(v, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def top_positions(votes: torch.Tensor, limit: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` best-voted positions below each row's `limit` [B] (where its window starts), per layer and KV
    head of votes [L, B, H, S]: (positions [L, B, H, n] ascending, valid [L, B, H, n]); a short prompt's
    empty picks come last, as position 0 and not valid."""
    S = votes.shape[-1]
    eligible = torch.arange(S, device=votes.device) < limit[:, None]  # [B, S]
    scored = votes.masked_fill(~eligible[None, :, None], float("-inf"))
    if S < n:
        scored = F.pad(scored, (0, n - S), value=float("-inf"))
    top = scored.topk(n, dim=-1)
    valid = top.values > float("-inf")
    # ascending original positions per head; empty picks (short prompts) sorted to the end
    order_key = torch.where(valid, top.indices, torch.iinfo(torch.long).max)
    kept_pos, order = order_key.sort(dim=-1)
    valid = valid.gather(-1, order)
    return torch.where(valid, kept_pos, 0), valid


class _ObservedView(PagedView):
    """A read-only view of one request's blocks whose attention calls `observer(layer, q, keys, mask)`."""

    def __init__(self, cache: PagedKVCache, table: torch.Tensor,
                 observer: Callable[[int, torch.Tensor, torch.Tensor, AttentionMask], None]) -> None:
        super().__init__(cache, table)
        self.observer = observer

    def begin(self, positions: torch.Tensor) -> PagedStep:
        return _ObservedStep(self, positions)


class _ObservedStep(PagedStep):
    def __init__(self, view: _ObservedView, positions: torch.Tensor) -> None:
        super().__init__(view, positions)
        self.observer = view.observer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        # the observed tokens' keys are in the cache already (the prefill put them there): read, never write
        mask = self.window_mask(self.cache.windows[layer])  # a sliding layer sees its window only
        S = mask.kv_len
        K, V, table, _ = self.group_of(layer)
        keys = self._gather(K, S, table)
        self.observer(layer, q, keys, mask)
        return attend(q, keys, self._gather(V, S, table), mask, softcap=self.cache.softcap, sinks=sinks)


@torch.inference_mode()
def select_paged(model: Transformer, cache: PagedKVCache, tokens: list[int], blocks: list[int], kept: list[int],
                 n: int, window: int, observe: int, kernel: int) -> int:
    """SnapKV over the paged cache for one prompt `tokens` whose KV is in `blocks`: copy the `n` best-voted
    positions before its last `window` ones, per layer and KV head, into slots 0 … n-1 of the `kept` blocks.
    Returns how many slots hold a selection (fewer than n when the prompt is short)."""
    device = cache.k.device
    S = len(tokens)
    width = min(observe, S)
    pos = torch.arange(S - width, S, device=device)[None]
    ids = torch.tensor([tokens[S - width :]], device=device)
    votes: dict[int, torch.Tensor] = {}

    def observer(layer: int, q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> None:
        votes[layer] = pooled_votes(q, k, mask.allowed, pos >= 0, kernel)

    table = cache.table([blocks])
    model(ids, pos, _ObservedView(cache, table, observer), logits_index=torch.zeros((1, 1), dtype=torch.long,
                                                                                      device=device))
    stacked = torch.stack([votes[i] for i in range(len(votes))])  # [L, 1, H, S]
    limit = torch.tensor([max(S - window, 0)], device=device)
    kept_pos, valid = top_positions(stacked, limit, n)
    count = int(valid[0, 0, 0].sum())
    if count == 0:
        return 0
    # the selection of the layers read through the row's own blocks (a sliding group's are read in its window)
    own = [i for i in range(cache.n_layers) if not cache.layer_group[i]]
    kept_pos = kept_pos[own]
    L, _, H, _ = kept_pos.shape
    P = cache.block_size
    src = kept_pos[:, 0, :, :count]  # [L, H, count]
    layer = torch.tensor([cache.layer_slot[i] for i in own], device=device)[:, None, None]
    head = torch.arange(H, device=device)[None, :, None]
    pages = table[0][src // P]
    slots = torch.arange(count, device=device)
    dest_pages = torch.tensor(kept, device=device)[slots // P][None, None]
    for buf in (cache.k, cache.v):
        buf[layer, dest_pages, head, (slots % P)[None, None]] = buf[layer, pages, head, src % P]
    return count
