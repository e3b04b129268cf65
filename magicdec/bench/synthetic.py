"""Synthetic acceptance for systems benchmarks with random weights: every draft token is accepted with
a chosen probability whatever its value, so throughput at a given acceptance rate can be measured without
real weights. The output is not the model's; runs using this are labelled synthetic."""

from __future__ import annotations

import torch

from magicdec.spec.verify import Verdict, Verifier, accepted_prefix


def verify_synthetic(
    draft_tokens: torch.Tensor, target_logits: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept each draft token with probability α whatever its value; the next token is the target's
    argmax after the accepted prefix."""
    ok = torch.rand(draft_tokens.shape, generator=generator, device=draft_tokens.device) < alpha
    k = accepted_prefix(ok)
    return k, target_logits.argmax(-1).gather(1, k[:, None]).squeeze(1)


def synthetic_verifier(alpha: float, seed: int = 0) -> Verifier:
    """A verifier accepting each draft with probability `alpha` (`verify_synthetic`), drawing from one
    generator per device seeded with `seed`."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"synthetic acceptance must be in [0, 1], got {alpha}")
    gens: dict[torch.device, torch.Generator] = {}

    def synthetic(d: torch.Tensor, q: torch.Tensor | None, logits: torch.Tensor) -> Verdict:
        g = gens.setdefault(d.device, torch.Generator(device=d.device).manual_seed(seed))
        return verify_synthetic(d, logits, alpha, g)

    return synthetic
