"""Log-probabilities of chosen tokens, from the target's logits before any processing (vLLM's default: no
temperature, penalties or truncation), so speculative and plain decoding report the same numbers: under
speculation they come from the verification forward's logits at each accepted position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability, its rank (1 + how many other tokens are at least as likely: vLLM's) and the
    `top` most likely tokens at its position, (id, logprob) best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None

    def keep(self, k: int) -> TokenLogprob:
        """The same with only the k best alternatives."""
        return self if len(self.top) <= k else replace(self, top=self.top[:k])


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """logits [T, V] of the positions that chose `tokens` [T] → each token's log-probability, its rank and the
    `top` best alternatives."""
    if not len(tokens):
        return []
    lp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
    ids = torch.as_tensor(list(tokens), device=lp.device)
    picked = lp.gather(1, ids[:, None])
    ranks = (lp >= picked).sum(-1).tolist()
    chosen = picked[:, 0].tolist()
    if top:
        values, index = lp.topk(top, dim=-1)
        vs, ix = values.tolist(), index.tolist()
        return [TokenLogprob(t, c, tuple(zip(i, v)), r) for t, c, i, v, r in zip(tokens, chosen, ix, vs, ranks)]
    return [TokenLogprob(t, c, (), r) for t, c, r in zip(tokens, chosen, ranks)]
