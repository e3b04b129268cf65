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
from magicdec.model.llama import Cache
from magicdec.spec.drafter import Drafter
from magicdec.spec.verify import verify_greedy, verify_sampling, verify_synthetic

Progress = Callable[[int], None]


class Forward(Protocol):
    """The model, or a `ModelRunner` replaying it as CUDA graphs."""

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: Cache,
                 logits_index: torch.Tensor | None = None) -> torch.Tensor: ...
Verdict = tuple[torch.Tensor, torch.Tensor]  # accepted counts [B], next tokens [B]
# (draft tokens [B, γ], draft distributions [B, γ, V] | None, target logits [B, γ+1, V]) → verdict
Verifier = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], Verdict]


def make_verifier(params: SamplingParams, generator: torch.Generator | None,
                  synthetic_acceptance: float | None = None) -> Verifier:
    """The acceptance rule for these sampling parameters (or the synthetic one for benchmarks)."""
    if synthetic_acceptance is not None:
        gens: dict[torch.device, torch.Generator] = {}

        def synthetic(d: torch.Tensor, q: torch.Tensor | None, logits: torch.Tensor) -> Verdict:
            g = generator or gens.setdefault(d.device, torch.Generator(device=d.device).manual_seed(0))
            return verify_synthetic(d, logits, synthetic_acceptance, g)

        return synthetic
    if params.greedy:
        return lambda d, q, logits: verify_greedy(d, logits)

    def sampling(d: torch.Tensor, q: torch.Tensor | None, logits: torch.Tensor) -> Verdict:
        assert q is not None
        return verify_sampling(d, q, probabilities(logits, params), generator)

    return sampling


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


class PhaseClock:
    """Marks phase boundaries without synchronising: CUDA events on CUDA, read once the round's
    results have been read back anyway; the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Durations between consecutive marks (call after the device work is done)."""
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _drop_finished(state: BatchState, caches: list[DenseKVCache | Drafter], eager: bool) -> None:
    state.refresh_active()
    keep = state.compaction_plan(eager)
    if keep is not None:
        state.compact(keep)
        for c in caches:
            c.compact(keep)


def _extend(state: BatchState, stopper: Stopper, new: list[list[int]], progress: Progress | None) -> int:
    """Apply the stop rules to each live row's new tokens; returns how many tokens were appended."""
    added = 0
    for i in state.live():
        out = state.outputs[i]
        before = len(out.token_ids)
        stopper.extend(out, new[i])
        added += len(out.token_ids) - before
    if progress:
        progress(added)
    return added


class SteadyClock:
    """Accumulates time and tokens of the steps taken while the whole batch was generating."""

    def __init__(self, state: BatchState, stats: RunStats) -> None:
        self.full, self.stats = len(state.live()), stats
        self.last = time.perf_counter()

    def step(self, live_before: int, added: int) -> None:
        now = time.perf_counter()
        if live_before == self.full:
            self.stats.steady_s += now - self.last
            self.stats.steady_tokens += added
        self.last = now


@torch.inference_mode()
def decode_plain(
    forward: Forward,
    cache: DenseKVCache,
    state: BatchState,
    params: SamplingParams,
    generator: torch.Generator | None,
    stopper: Stopper,
    stats: RunStats,
    progress: Progress | None = None,
    eager: bool = True,
) -> None:
    """Plain decoding. `eager`: drop finished rows at once (no CUDA graphs to keep)."""
    _drop_finished(state, [cache], eager)
    start = time.perf_counter()
    steady = SteadyClock(state, stats)
    while live := len(state.live()):
        pos = state.lengths[:, None]
        logits = forward(state.tokens.gather(1, pos), state.positions(pos), cache)[:, 0]
        nxt = next_tokens(logits, params, generator)
        state.commit(nxt[:, None], torch.ones_like(nxt))
        steady.step(live, _extend(state, stopper, [[t] for t in nxt.tolist()], progress))
        _drop_finished(state, [cache], eager)
    stats.decode_s += time.perf_counter() - start


@torch.inference_mode()
def decode_speculative(
    forward: Forward,
    cache: DenseKVCache,
    drafter: Drafter,
    state: BatchState,
    params: SamplingParams,
    generator: torch.Generator | None,
    stopper: Stopper,
    stats: RunStats,
    policy: GammaPolicy,
    verifier: Verifier,
    progress: Progress | None = None,
    eager: bool = True,
) -> None:
    device = state.tokens.device
    _drop_finished(state, [cache, drafter], eager)
    start = time.perf_counter()
    steady = SteadyClock(state, stats)
    while live := len(state.live()):
        gamma = policy.choose(state)
        stats.gamma_history.append(gamma)
        if gamma == 0:
            added = _plain_step(forward, cache, drafter, state, params, generator, stopper, progress)
        else:
            added = _speculative_round(forward, cache, drafter, state, params, generator, stopper, stats, policy,
                                       verifier, gamma, device, progress)
        steady.step(live, added)
        _drop_finished(state, [cache, drafter], eager)
    stats.decode_s += time.perf_counter() - start


def _speculative_round(
    forward: Forward,
    cache: DenseKVCache,
    drafter: Drafter,
    state: BatchState,
    params: SamplingParams,
    generator: torch.Generator | None,
    stopper: Stopper,
    stats: RunStats,
    policy: GammaPolicy,
    verifier: Verifier,
    gamma: int,
    device: torch.device,
    progress: Progress | None,
) -> int:
    lengths = state.lengths
    clock = PhaseClock(device)
    clock.mark()
    drafts, draft_probs = drafter.propose(state.tokens, lengths, gamma, params, generator, state.active)
    clock.mark()
    pos = lengths[:, None] + torch.arange(gamma + 1, device=device)
    logits = forward(torch.cat([state.pending(), drafts], dim=1), state.positions(pos), cache)
    accepted, nxt = verifier(drafts, draft_probs, logits)
    clock.mark()
    drafter.commit(lengths, accepted, gamma, cache, state.active)
    new = torch.cat([drafts, nxt[:, None]], dim=1).scatter_(1, accepted[:, None], nxt[:, None])
    state.commit(new, accepted + 1)
    host = torch.cat([accepted[:, None], new], dim=1).tolist()  # the round's one device read
    draft_s, verify_s = clock.seconds()
    stats.draft_s += draft_s
    stats.verify_s += verify_s
    live = state.live()
    accepted_list = [host[i][0] for i in live]
    stats.record_round(gamma, accepted_list)
    policy.observe(gamma, accepted_list)
    for i, k in zip(live, accepted_list):
        out = state.outputs[i]
        out.spec.rounds += 1
        out.spec.draft_tokens += gamma
        out.spec.accepted_tokens += k
    return _extend(state, stopper, [row[1 : row[0] + 2] for row in host], progress)


def _plain_step(
    forward: Forward,
    cache: DenseKVCache,
    drafter: Drafter,
    state: BatchState,
    params: SamplingParams,
    generator: torch.Generator | None,
    stopper: Stopper,
    progress: Progress | None,
) -> int:
    """A round with γ = 0: one target step; the drafter is told the pending token is committed."""
    lengths = state.lengths
    pos = lengths[:, None]
    logits = forward(state.pending(), state.positions(pos), cache)[:, 0]
    nxt = next_tokens(logits, params, generator)
    drafter.commit(lengths, torch.zeros_like(lengths), 0, cache, state.active)
    state.commit(nxt[:, None], torch.ones_like(nxt))
    return _extend(state, stopper, [[t] for t in nxt.tolist()], progress)
