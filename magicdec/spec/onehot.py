"""Exact verification of deterministic drafts (prompt lookup, suffix matching): the draft distribution is
one-hot on each proposed token, so speculative sampling accepts d_i with probability min(1, p_i(d_i) / 1) =
p_i(d_i) and, at the first rejection, samples from normalise(max(p_i − onehot(d_i), 0)): p_i without d_i.
After γ acceptances it samples the bonus token from p_{γ+1}. The committed tokens are distributed as plain
sampling from p (tests/test_lookup.py checks it with χ²); greedy verification needs no change.

`verify_deterministic` is `magicdec.spec.verify.verify_sampling` with q = `onehot_probs(d, V)` without the
[B, γ, V] draft tensor: the same random draws in the same order, so with the same generator both return
the same tokens (tested). A batch mixing model-free rows with sampled self-draft rows can pass the former's
`onehot_probs` to `verify_sampling` instead.
"""

from __future__ import annotations

import torch

from magicdec.spec.verify import accepted_prefix


def onehot_probs(draft_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The draft distribution of deterministic drafts [B, γ] → [B, γ, V]."""
    return torch.nn.functional.one_hot(draft_tokens, vocab_size).to(torch.float32)


def verify_deterministic(draft_tokens: torch.Tensor, target_probs: torch.Tensor,
                         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of deterministic drafts: draft_tokens [B, γ], target_probs [B, γ+1, V] (after the
    request's sampling processing) → accepted counts [B] and next tokens [B]."""
    B, gamma = draft_tokens.shape
    p = target_probs[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)
    u = torch.rand((B, gamma), generator=generator, device=p.device)
    k = accepted_prefix(u < p)
    rows = torch.arange(B, device=p.device)
    residual = target_probs[rows, k].clone()
    rejected = k < gamma
    d = draft_tokens.gather(1, k.clamp(max=gamma - 1)[:, None]).squeeze(1) if gamma else k
    residual[rows[rejected], d[rejected]] = 0.0
    mass = residual.sum(-1, keepdim=True)
    # a rejected draft with p(d) = 1 was rejected with probability 0; p itself is then exact
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target_probs[rows, k])
    token = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return k, token
