"""Penalties, logit bias and min_tokens: the logits adjustments that depend on the tokens before a position.

`TokenHistory` keeps, for one request, the counts of its output tokens and which tokens its prompt holds
(on the logits' device). `adjust(logits, drafts)` adjusts the logits of T consecutive positions: position j
sees the committed tokens plus the first j of `drafts` (the tokens a speculative round placed before it),
so a verification scores every position exactly as plain decoding would after committing those tokens,
and a draft applies the same rule to its own proposals. Order (vLLM's): min_tokens (EOS and stop token ids
at -inf while the output is shorter), logit bias, then the repetition penalty (prompt and output tokens:
positive logits divided by it, negative ones multiplied), frequency penalty (minus count × penalty) and
presence penalty (minus penalty for every token seen) over output tokens. Temperature, min-p, top-k and
top-p follow in `sampling.probabilities`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from magicdec.runtime.grammar import GrammarState
from magicdec.runtime.sampling import SamplingParams


def processed(logits: torch.Tensor, drafts: Sequence[int] | torch.Tensor, history: TokenHistory | None,
              grammar: GrammarState | None) -> torch.Tensor:
    """T positions' logits [T, V'] after `drafts` (see `TokenHistory.adjust`) with the request's penalties,
    bias and min_tokens, then its grammar's mask (-inf where the grammar refuses): float32, a copy."""
    out = history.adjust(logits, drafts) if history is not None else logits.to(torch.float32, copy=True)
    if grammar is not None:
        allowed = grammar.masks(drafts, logits.shape[0])[:, : out.shape[-1]].to(out.device)
        out.masked_fill_(~allowed, float("-inf"))
    return out


def needs_history(params: SamplingParams) -> bool:
    """Whether `params` adjusts logits by what came before (else logits go to sampling untouched)."""
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
                or params.logit_bias or params.min_tokens)


class TokenHistory:
    """A request's token counts for its logits adjustments: output counts [V] and the prompt's tokens [V]."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], vocab_size: int, device: torch.device,
                 stop_ids: Iterable[int] = ()) -> None:
        self.params, self.vocab_size = params, vocab_size
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt:
            self.in_prompt[torch.tensor(list(prompt), device=device)] = True
        self.outputs = 0
        stops = sorted({t for t in stop_ids if 0 <= t < vocab_size})
        self.stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
        bias = [(t, b) for t, b in params.logit_bias if 0 <= t < vocab_size]
        self.bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=device)
        self.bias = torch.tensor([b for _, b in bias], dtype=torch.float32, device=device)

    def add(self, tokens: Sequence[int]) -> None:
        """Committed output tokens."""
        if tokens:
            t = torch.tensor(list(tokens), device=self.counts.device)
            self.counts.index_add_(0, t, torch.ones(len(tokens), device=t.device))
            self.outputs += len(tokens)

    def adjust(self, logits: torch.Tensor, drafts: Sequence[int] | torch.Tensor = ()) -> torch.Tensor:
        """logits [T, V'] (V' ≤ V: a draft's shorter vocabulary) of T consecutive positions after the committed
        tokens and `drafts` → adjusted float32 logits [T, V']. The last T − 1 drafts lie between the positions
        (a verification of [pending, d_1 … d_γ] passes the γ drafts: position j sees d_1 … d_j); any before
        them precede position 0 (the draft's j-th step passes its j proposals so far)."""
        p, T, V = self.params, logits.shape[0], logits.shape[-1]
        dev = logits.device
        d = torch.as_tensor(drafts, device=dev).long().reshape(-1)
        lead = d.numel() - (T - 1)
        assert lead >= 0, "fewer drafts than the positions between them"
        out = logits.float().clone()
        seen = torch.zeros((T, V), dtype=torch.float32, device=dev)
        if d.numel():
            # draft m (0-based) is seen from position max(m - lead + 1, 0) on
            start = (torch.arange(d.numel(), device=dev) - lead + 1).clamp(min=0)
            keep = d < V
            seen.index_put_((start[keep], d[keep]), torch.ones(int(keep.sum()), device=dev), accumulate=True)
            seen = seen.cumsum(0)
        counts = self.counts[None, :V] + seen
        if p.min_tokens and self.stop_ids.numel():
            short = torch.arange(T, device=dev) + self.outputs + lead < p.min_tokens
            ids = self.stop_ids[self.stop_ids < V]
            rows = short.nonzero()[:, 0]
            if rows.numel() and ids.numel():
                out[rows[:, None], ids[None, :]] = float("-inf")
        if self.bias_ids.numel():
            keep = self.bias_ids < V
            out[:, self.bias_ids[keep]] += self.bias[keep]
        if p.repetition_penalty != 1.0:
            seen_any = (counts > 0) | self.in_prompt[None, :V]
            scaled = torch.where(out > 0, out / p.repetition_penalty, out * p.repetition_penalty)
            out = torch.where(seen_any, scaled, out)
        if p.frequency_penalty:
            out = out - p.frequency_penalty * counts
        if p.presence_penalty:
            out = out - p.presence_penalty * (counts > 0).float()
        return out
