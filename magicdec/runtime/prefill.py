"""Chunked, batched prefill of prompts of different lengths.

Rows are sorted by prompt length, longest first, so the rows that still have prompt tokens in a
chunk are always a prefix of the batch and the forward runs on a slice of the cache. Each chunk is
at most `chunk` tokens per row, so attention never builds a prompt × prompt score matrix; shorter
rows are padded inside their last chunk with position -1, which nothing attends to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from magicdec.model.llama import Cache, Transformer


@torch.inference_mode()
def prefill(
    model: Transformer, cache: Cache, tokens: torch.Tensor, prompt_lens: list[int], chunk: int, start: int = 0,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the prompts (tokens[b, :prompt_lens[b]], lengths non-increasing) through `model` into
    `cache`, from position `start` on (the positions before it are cached already). Returns the
    logits after each prompt's last token, [B, V]; `progress` is told the prompt tokens of each chunk."""
    if chunk < 1:
        raise ValueError(f"prefill chunk must be ≥ 1, got {chunk}")
    if any(a < b for a, b in zip(prompt_lens, prompt_lens[1:])):
        raise ValueError("prefill expects rows sorted by prompt length, longest first")
    device = tokens.device
    lens = torch.tensor(prompt_lens, device=device)
    last = torch.empty((len(prompt_lens), model.config.vocab_size), dtype=model.dtype, device=device)
    if not 0 <= start < prompt_lens[-1]:
        raise ValueError(f"prefill starts at {start}, not inside every prompt (the shortest has {prompt_lens[-1]})")
    for first in range(start, prompt_lens[0], chunk):
        rows = sum(n > first for n in prompt_lens)
        width = min(chunk, prompt_lens[0] - first)
        pos = torch.arange(first, first + width, device=device).expand(rows, width)
        pos = torch.where(pos < lens[:rows, None], pos, -1)
        ids = tokens[:rows, first : first + width].masked_fill(pos < 0, 0)
        index = (lens[:rows] - 1 - first).clamp(0, width - 1)[:, None]
        logits = model(ids, pos, cache, logits_index=index)[:, 0]
        ends = [r for r in range(rows) if prompt_lens[r] <= first + width]
        if ends:
            last[ends] = logits[ends]
        if progress is not None:
            progress(sum(min(n, first + width) - first for n in prompt_lens[:rows]))
    return last
