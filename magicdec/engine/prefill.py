"""Chunked, batched prefill of prompts of different lengths.

Rows are sorted by prompt length, longest first, so the rows that still have prompt tokens in a
chunk are always a prefix of the batch and the forward runs on a slice of the cache. Each chunk is
at most `chunk` tokens per row, so attention never builds a prompt × prompt score matrix; shorter
rows are padded inside their last chunk with position -1, which nothing attends to.
"""

from __future__ import annotations

import torch

from magicdec.model.llama import Cache, Transformer


@torch.inference_mode()
def prefill(
    model: Transformer, cache: Cache, tokens: torch.Tensor, prompt_lens: list[int], chunk: int
) -> torch.Tensor:
    """Run the prompts (tokens[b, :prompt_lens[b]], lengths non-increasing) through `model` into
    `cache`. Returns the logits after each prompt's last token, [B, V]."""
    if chunk < 1:
        raise ValueError(f"prefill chunk must be ≥ 1, got {chunk}")
    if any(a < b for a, b in zip(prompt_lens, prompt_lens[1:])):
        raise ValueError("prefill expects rows sorted by prompt length, longest first")
    device = tokens.device
    lens = torch.tensor(prompt_lens, device=device)
    last = torch.empty((len(prompt_lens), model.config.vocab_size), dtype=model.dtype, device=device)
    for start in range(0, prompt_lens[0], chunk):
        rows = sum(n > start for n in prompt_lens)
        width = min(chunk, prompt_lens[0] - start)
        pos = torch.arange(start, start + width, device=device).expand(rows, width)
        pos = torch.where(pos < lens[:rows, None], pos, -1)
        ids = tokens[:rows, start : start + width].masked_fill(pos < 0, 0)
        index = (lens[:rows] - 1 - start).clamp(0, width - 1)[:, None]
        logits = model(ids, pos, cache, logits_index=index)[:, 0]
        ends = [r for r in range(rows) if prompt_lens[r] <= start + width]
        if ends:
            last[ends] = logits[ends]
    return last
