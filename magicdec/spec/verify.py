"""Verification: which drafted tokens the target accepts, and the token it adds.

Both rules take the target's scores for the γ+1 positions of one forward over
[pending, d_1 … d_γ] and return, per sequence, the number of accepted draft tokens k (0 … γ) and
the next token (the correction at the first rejection, or the bonus token after γ acceptances).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Verdict = tuple[torch.Tensor, torch.Tensor]  # accepted counts [B], next tokens [B]
# (draft tokens [B, γ], draft distributions [B, γ, V] | None, target logits [B, γ+1, V]) → verdict
Verifier = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], Verdict]


def accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """ok [B, γ] bool → length of the leading run of True per row."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the longest prefix of drafts equal to the target's argmax; then the target's argmax.
    The committed tokens are exactly those plain greedy decoding produces."""
    target = target_logits.argmax(-1)  # [B, γ+1]
    k = accepted_prefix(draft_tokens == target[:, :-1])
    return k, target.gather(1, k[:, None]).squeeze(1)


def verify_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al., Chen et al.): accept d_i with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from normalise(max(p_i - q_i, 0));
    after γ acceptances sample from p_{γ+1}. The committed tokens are distributed as plain sampling
    from p. draft_probs [B, γ, V], target_probs [B, γ+1, V], both after the same processing."""
    B, gamma = draft_tokens.shape
    p = target_probs[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)
    q = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
    u = torch.rand((B, gamma), generator=generator, device=p.device)
    k = accepted_prefix(u * q < p)
    rows = torch.arange(B, device=p.device)
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)[rows, k]
    p_next = target_probs[rows, k]
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # p == q exactly leaves no residual mass; then the rejection had probability 0 and p is exact
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
    token = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return k, token
