"""Sampling parameters and the one place logits become a distribution or a token.

Temperature, then top-k, then top-p (the order Hugging Face applies them), identically for the
target and the draft, so speculative sampling reproduces plain sampling's distribution.
Temperature 0 means greedy: the argmax, and a one-hot distribution where one is needed; so does any
temperature below `GREEDY_BELOW` (vLLM's epsilon), which dividing the logits by would overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from magicdec.runtime import checks

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (logits / T would overflow to inf, softmax to NaN)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        who = "SamplingParams"
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, tuple | list) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"{who}: stop must be a string or a list of strings, got {self.stop!r}")
        checks.flag(who, "ignore_eos", self.ignore_eos)
        checks.set_fields(self, max_new_tokens=checks.integer(who, "max_new_tokens", self.max_new_tokens),
                          temperature=checks.real(who, "temperature", self.temperature),
                          top_k=checks.integer(who, "top_k", self.top_k), top_p=checks.real(who, "top_p", self.top_p),
                          seed=checks.integer(who, "seed", self.seed, optional=True), stop=tuple(stop))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number ≥ 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also false for NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] → float32 probabilities after temperature, top-k and top-p."""
    if params.greedy:
        probs = torch.zeros_like(logits, dtype=torch.float32)
        return probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(-1)
        # drop a token when the tokens before it already hold top_p of the mass (keeps ≥ 1 token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[..., 0] = False  # the most likely token stays, whatever top_p rounds to
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return scores.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [..., V] (argmax for one-hot rows), as a long tensor [...]."""
    if generator is None:
        return probs.argmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from logits [..., V] (argmax when greedy)."""
    if params.greedy:
        return logits.argmax(-1)
    return sample(probabilities(logits, params), generator)
