"""SnapKV-style selection of the prompt positions a draft keeps.

The prompt's last `observe` queries vote, per layer and KV head, for the positions they attend to
most (attention weights summed over the observation queries and over the query heads of each KV
group, then smoothed by a 1-D pooling so neighbours of strong positions come along). The top
positions outside the recent window are kept; the window itself slides during decoding.

Votes are collected by running the target once more over each prompt's last `observe` tokens with
an observer on its cache, read-only: the cache already holds those tokens' keys, so nothing the
target later decodes from changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.sparse import SparseKVCache
from magicdec.model.attention import AttentionMask
from magicdec.model.llama import Transformer


@torch.inference_mode()
def snapkv_votes(
    model: Transformer, cache: DenseKVCache, tokens: torch.Tensor, prompt_lens: list[int], observe: int, kernel: int
) -> torch.Tensor:
    """Pooled attention votes [L, B, Hkv, S] of each prompt's last `observe` queries."""
    device = tokens.device
    lens = torch.tensor(prompt_lens, device=device)
    width = min(observe, max(prompt_lens))
    pos = lens[:, None] - width + torch.arange(width, device=device)
    pos = torch.where(pos >= 0, pos, -1)
    ids = tokens.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, 0)
    votes: dict[int, torch.Tensor] = {}

    def observer(layer: int, q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> None:
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        qg = q.reshape(B, Hkv, (Hq // Hkv) * T, D)
        scores = (qg @ k.transpose(-1, -2)) * D**-0.5  # [B, Hkv, g*T, S]
        allowed = mask.allowed[:, None].repeat(1, 1, Hq // Hkv, 1).reshape(B, 1, -1, k.shape[2])
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs = probs * (pos >= 0).repeat(1, Hq // Hkv)[:, None, :, None]  # padding queries do not vote
        v = probs.sum(2)  # [B, Hkv, S]
        votes[layer] = F.avg_pool1d(v, kernel, stride=1, padding=kernel // 2, count_include_pad=False)

    cache.observer, cache.read_only = observer, True
    try:
        model(ids, pos, cache, logits_index=torch.zeros((len(prompt_lens), 1), dtype=torch.long, device=device))
    finally:
        cache.observer, cache.read_only = None, False
    return torch.stack([votes[i] for i in range(len(votes))])


def select_kept(
    draft: SparseKVCache, target: DenseKVCache, votes: torch.Tensor, prompt_lens: list[int]
) -> None:
    """Fill the draft's kept region with the top-voted positions before each prompt's window."""
    L, B, H, S = votes.shape
    n = draft.n_kept
    lens = torch.tensor(prompt_lens, device=votes.device)
    limit = (lens - draft.window).clamp(min=0)  # positions ≥ limit are in the sliding window
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
    kept_pos = torch.where(valid, kept_pos, 0)
    D = target.k.shape[-1]
    idx = kept_pos[..., None].expand(L, B, H, n, D)
    k = target.k[:, :B].gather(3, idx)
    v = target.v[:, :B].gather(3, idx)
    draft.set_kept(k, v, valid[0, :, 0])
