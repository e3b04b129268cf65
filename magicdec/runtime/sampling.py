"""Sampling parameters and the one place logits become a distribution or a token.

Temperature, then min-p, then top-k, then top-p, identically for the target and the draft, so speculative
sampling reproduces plain sampling's distribution. (Penalties, logit bias and min_tokens depend on the
tokens before a position: `runtime/penalties.py` applies them to the logits first.)
Temperature 0 means greedy: the argmax, and a one-hot distribution where one is needed; so does any
temperature below `GREEDY_BELOW` (vLLM's epsilon), which dividing the logits by would overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from magicdec.runtime import checks

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (logits / T would overflow to inf, softmax to NaN)
MAX_LOGPROBS = 20  # the most alternatives a token's log-probabilities list (vLLM's default bound)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # penalties and bias (runtime/penalties.py), min-p
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs (a dict is taken too)
    min_p: float = 0.0
    # stop rules
    min_tokens: int = 0  # EOS and stop_token_ids masked until this many tokens; stop strings in later tokens only
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the output like EOS (even with ignore_eos)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # log-probabilities of the target's logits (before any processing): None = none; k = the chosen token's
    # and the k most likely
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # … of the prompt's tokens (the request skips the prefix cache)
    grammar: str | None = None  # structured output: an llguidance grammar (runtime/grammar.py) masks every token

    def __post_init__(self) -> None:
        who = "SamplingParams"
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, tuple | list) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"{who}: stop must be a string or a list of strings, got {self.stop!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            checks.flag(who, name, getattr(self, name))
        checks.text(who, "grammar", self.grammar, optional=True)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        checks.set_fields(self, logit_bias=tuple(sorted((checks.integer(who, "logit_bias token", t),
                                                         checks.real(who, "logit_bias value", b)) for t, b in bias)),
                          stop_token_ids=tuple(checks.integer(who, "stop_token_ids", t) for t in self.stop_token_ids),
                          presence_penalty=checks.real(who, "presence_penalty", self.presence_penalty),
                          frequency_penalty=checks.real(who, "frequency_penalty", self.frequency_penalty),
                          repetition_penalty=checks.real(who, "repetition_penalty", self.repetition_penalty),
                          min_p=checks.real(who, "min_p", self.min_p),
                          min_tokens=checks.integer(who, "min_tokens", self.min_tokens),
                          logprobs=checks.integer(who, "logprobs", self.logprobs, optional=True),
                          prompt_logprobs=checks.integer(who, "prompt_logprobs", self.prompt_logprobs, optional=True))
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not (math.isfinite(b) and -100 <= b <= 100) for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in 0 … max_new_tokens ({self.max_new_tokens}), got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in 0 … {MAX_LOGPROBS}, got {k}")

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
    """logits [..., V] → float32 probabilities after temperature, min-p, top-k and top-p."""
    if params.greedy:
        probs = torch.zeros_like(logits, dtype=torch.float32)
        return probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scores = logits.float() / params.temperature
    if params.min_p > 0:  # drop tokens less likely than min_p × the most likely one's probability
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
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
