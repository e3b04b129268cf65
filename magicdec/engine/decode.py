"""The two decoding loops: plain (one token per step) and speculative (draft → verify → commit).

Both advance every row by its own amount, apply the stop rules as tokens are committed, and take
finished rows out of the forwards (see `BatchState`). A speculative round reads the device once
(accepted counts and new tokens), which the stop rules need anyway; γ = 0 rounds are plain steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
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

    def observe(self, gamma: int, accepted: list[int], seconds: tuple[float, float, float]) -> None:
        """The round just verified: accepted counts, and (draft, verify, rest) seconds; a plain step
        reports (0, its seconds, 0)."""
        ...


class FixedGamma:
    def __init__(self, gamma: int) -> None:
        self.gamma = gamma

    def choose(self, state: BatchState) -> int:
        return self.gamma

    def observe(self, gamma: int, accepted: list[int], seconds: tuple[float, float, float]) -> None:
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


@dataclass(slots=True)
class Decoding:
    """One batch being decoded: the target's forward and cache, the batch state, sampling and stop rules,
    and where timings go. `eager`: drop finished rows from the caches at once (no CUDA graphs to keep)."""

    forward: Forward
    cache: DenseKVCache
    state: BatchState
    params: SamplingParams
    generator: torch.Generator | None
    stopper: Stopper
    stats: RunStats
    progress: Progress | None = None
    eager: bool = True

    @torch.inference_mode()
    def run_plain(self) -> None:
        self._run(lambda: self._plain_step(None))

    @torch.inference_mode()
    def run_speculative(self, drafter: Drafter, policy: GammaPolicy, verifier: Verifier) -> None:
        def step() -> int:
            gamma = policy.choose(self.state)
            self.stats.gamma_history.append(gamma)
            if gamma == 0:
                t0 = time.perf_counter()
                added = self._plain_step(drafter)  # ends with a device read: the host clock is exact
                policy.observe(0, [], (0.0, time.perf_counter() - t0, 0.0))
                return added
            return self._round(drafter, policy, verifier, gamma)

        self._run(step, drafter)

    def _run(self, step: Callable[[], int], drafter: Drafter | None = None) -> None:
        caches: list[DenseKVCache | Drafter] = [self.cache] if drafter is None else [self.cache, drafter]
        self._drop_finished(caches)
        start = time.perf_counter()
        steady = SteadyClock(self.state, self.stats)
        while live := len(self.state.live()):
            steady.step(live, step())
            self._drop_finished(caches)
        self.stats.decode_s += time.perf_counter() - start

    def _drop_finished(self, caches: list[DenseKVCache | Drafter]) -> None:
        self.state.refresh_active()
        keep = self.state.compaction_plan(self.eager)
        if keep is not None:
            self.state.compact(keep)
            for c in caches:
                c.compact(keep)

    def _extend(self, new: list[list[int]]) -> int:
        """Apply the stop rules to each live row's new tokens; returns how many tokens were appended."""
        added = 0
        for i in self.state.live():
            out = self.state.outputs[i]
            before = len(out.token_ids)
            self.stopper.extend(out, new[i])
            added += len(out.token_ids) - before
        if self.progress:
            self.progress(added)
        return added

    def _plain_step(self, drafter: Drafter | None) -> int:
        """One target step; a drafter, if any, is told the pending token is committed."""
        state = self.state
        lengths = state.lengths
        pos = lengths[:, None]
        logits = self.forward(state.pending(), state.positions(pos), self.cache)[:, 0]
        nxt = next_tokens(logits, self.params, self.generator)
        if drafter is not None:
            drafter.commit(lengths, torch.zeros_like(lengths), 0, self.cache, state.active)
        state.commit(nxt[:, None], torch.ones_like(nxt))
        return self._extend([[t] for t in nxt.tolist()])

    def _round(self, drafter: Drafter, policy: GammaPolicy, verifier: Verifier, gamma: int) -> int:
        """Draft γ tokens, verify them in one target forward, commit each row's accepted prefix."""
        state, stats = self.state, self.stats
        lengths, device = state.lengths, state.tokens.device
        clock = PhaseClock(device)
        clock.mark()
        drafter.catch_up(self.cache, lengths, state.active)  # the KV of plain steps since the last round
        clock.mark()
        drafts, draft_probs = drafter.propose(state.tokens, lengths, gamma, self.params, self.generator,
                                              state.active)
        clock.mark()
        pos = lengths[:, None] + torch.arange(gamma + 1, device=device)
        logits = self.forward(torch.cat([state.pending(), drafts], dim=1), state.positions(pos), self.cache)
        accepted, nxt = verifier(drafts, draft_probs, logits)
        clock.mark()
        drafter.commit(lengths, accepted, gamma, self.cache, state.active)
        new = torch.cat([drafts, nxt[:, None]], dim=1).scatter_(1, accepted[:, None], nxt[:, None])
        state.commit(new, accepted + 1)
        host = torch.cat([accepted[:, None], new], dim=1).tolist()  # the round's one device read
        clock.mark()
        catch_up_s, draft_s, verify_s, rest_s = clock.seconds()
        stats.draft_s += draft_s
        stats.verify_s += verify_s
        live = state.live()
        accepted_list = [host[i][0] for i in live]
        stats.record_round(gamma, accepted_list)
        # catching up on plain steps is the price of switching back to drafting, not of a draft step
        policy.observe(gamma, accepted_list, (draft_s, verify_s, rest_s + catch_up_s))
        for i, k in zip(live, accepted_list):
            out = state.outputs[i]
            out.spec.rounds += 1
            out.spec.draft_tokens += gamma
            out.spec.accepted_tokens += k
        return self._extend([row[1 : row[0] + 2] for row in host])
