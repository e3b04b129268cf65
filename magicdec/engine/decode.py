"""The two decoding loops: plain (one token per step) and speculative (draft → verify → commit).

Both advance every row by its own amount, apply the stop rules as tokens are committed, and drop
finished rows from the state and the caches at once. The speculative round reads the device once
(accepted counts and new tokens), which the stop rules need anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from magicdec.cache.dense import DenseKVCache
from magicdec.engine.outputs import RunStats
from magicdec.engine.sampling import SamplingParams, next_tokens, probabilities
from magicdec.engine.state import BatchState, Stopper
from magicdec.model.llama import Transformer
from magicdec.spec.drafter import Drafter
from magicdec.spec.verify import verify_greedy, verify_sampling

Progress = Callable[[int], None]


class GammaPolicy(Protocol):
    def choose(self, state: BatchState) -> int:
        """γ for the next round (0: a plain decoding step)."""
        ...

    def observe(self, gamma: int, accepted: list[int]) -> None:
        """Accepted counts of the round just verified."""
        ...


class FixedGamma:
    def __init__(self, gamma: int) -> None:
        self.gamma = gamma

    def choose(self, state: BatchState) -> int:
        return self.gamma

    def observe(self, gamma: int, accepted: list[int]) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _drop_finished(state: BatchState, caches: list[DenseKVCache | Drafter]) -> None:
    keep = [i for i, o in enumerate(state.outputs) if o.finish_reason is None]
    if len(keep) < state.rows:
        state.compact(keep)
        for c in caches:
            c.compact(keep)


@torch.inference_mode()
def decode_plain(
    model: Transformer,
    cache: DenseKVCache,
    state: BatchState,
    params: SamplingParams,
    generator: torch.Generator | None,
    stopper: Stopper,
    stats: RunStats,
    progress: Progress | None = None,
) -> None:
    _drop_finished(state, [cache])
    start = time.perf_counter()
    while state.rows:
        pos = state.lengths[:, None]
        logits = model(state.tokens.gather(1, pos), pos, cache)[:, 0]
        nxt = next_tokens(logits, params, generator)
        state.commit(nxt[:, None], torch.ones_like(nxt))
        before = sum(len(o.token_ids) for o in state.outputs)
        for out, tok in zip(state.outputs, nxt.tolist()):
            stopper.extend(out, [tok])
        if progress:
            progress(sum(len(o.token_ids) for o in state.outputs) - before)
        _drop_finished(state, [cache])
    stats.decode_s += time.perf_counter() - start


@torch.inference_mode()
def decode_speculative(
    model: Transformer,
    cache: DenseKVCache,
    drafter: Drafter,
    state: BatchState,
    params: SamplingParams,
    generator: torch.Generator | None,
    stopper: Stopper,
    stats: RunStats,
    policy: GammaPolicy,
    progress: Progress | None = None,
) -> None:
    device = state.tokens.device
    _drop_finished(state, [cache, drafter])
    start = time.perf_counter()
    while state.rows:
        gamma = policy.choose(state)
        stats.gamma_history.append(gamma)
        before = sum(len(o.token_ids) for o in state.outputs)
        if gamma == 0:
            _plain_step(model, cache, drafter, state, params, generator, stopper)
        else:
            _speculative_round(model, cache, drafter, state, params, generator, stopper, stats, policy, gamma, device)
        if progress:
            progress(sum(len(o.token_ids) for o in state.outputs) - before)
        _drop_finished(state, [cache, drafter])
    stats.decode_s += time.perf_counter() - start


def _speculative_round(
    model: Transformer,
    cache: DenseKVCache,
    drafter: Drafter,
    state: BatchState,
    params: SamplingParams,
    generator: torch.Generator | None,
    stopper: Stopper,
    stats: RunStats,
    policy: GammaPolicy,
    gamma: int,
    device: torch.device,
) -> None:
    lengths = state.lengths
    t0 = time.perf_counter()
    drafts, draft_probs = drafter.propose(state.tokens, lengths, gamma, params, generator)
    _sync(device)
    t1 = time.perf_counter()
    pos = lengths[:, None] + torch.arange(gamma + 1, device=device)
    logits = model(torch.cat([state.pending(), drafts], dim=1), pos, cache)
    if params.greedy:
        accepted, nxt = verify_greedy(drafts, logits)
    else:
        assert draft_probs is not None
        accepted, nxt = verify_sampling(drafts, draft_probs, probabilities(logits, params), generator)
    drafter.commit(lengths, accepted, gamma, cache)
    new = torch.cat([drafts, nxt[:, None]], dim=1).scatter_(1, accepted[:, None], nxt[:, None])
    state.commit(new, accepted + 1)
    accepted_list, new_list = accepted.tolist(), new.tolist()  # the round's one device read
    stats.draft_s += t1 - t0
    stats.verify_s += time.perf_counter() - t1
    stats.record_round(gamma, accepted_list)
    policy.observe(gamma, accepted_list)
    for out, k, toks in zip(state.outputs, accepted_list, new_list):
        out.spec.rounds += 1
        out.spec.draft_tokens += gamma
        out.spec.accepted_tokens += k
        stopper.extend(out, toks[: k + 1])


def _plain_step(
    model: Transformer,
    cache: DenseKVCache,
    drafter: Drafter,
    state: BatchState,
    params: SamplingParams,
    generator: torch.Generator | None,
    stopper: Stopper,
) -> None:
    """A round with γ = 0: one target step; the drafter is told the pending token is committed."""
    lengths = state.lengths
    pos = lengths[:, None]
    logits = model(state.pending(), pos, cache)[:, 0]
    nxt = next_tokens(logits, params, generator)
    drafter.commit(lengths, torch.zeros_like(lengths), 0, cache)
    state.commit(nxt[:, None], torch.ones_like(nxt))
    for out, tok in zip(state.outputs, nxt.tolist()):
        stopper.extend(out, [tok])
