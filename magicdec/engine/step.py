"""The engine core: advance a batch one round at a time and report what the round did.

`Decoding.step(γ)` runs one plain step (γ = 0: one token per sequence) or one speculative round
(draft γ tokens → verify them in one target forward → commit each sequence's accepted prefix), applies
the stop rules to the committed tokens, takes finished rows out of the forwards (see `BatchState`),
and returns a `RoundReport`. A round reads the device once (accepted counts and new tokens), which the
stop rules need anyway. Who chooses γ, and what is done with the reports, is up to the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from magicdec.cache.dense import DenseKVCache
from magicdec.engine.batch import Batch
from magicdec.engine.state import BatchView, check_finite
from magicdec.model.llama import Cache
from magicdec.runtime.sampling import next_tokens
from magicdec.spec.drafter import Drafter
from magicdec.spec.verify import Verifier, verifier_for


class Forward(Protocol):
    """The model, or a `ModelRunner` replaying it as CUDA graphs."""

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: Cache,
                 logits_index: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class RoundReport:
    """One round: γ (0 = a plain step), each live row's accepted drafts, tokens appended to the outputs,
    and where the time went (host clock; phases from CUDA events on CUDA). `capture_s` is the part of
    `seconds` spent capturing CUDA graphs of shapes met for the first time."""

    gamma: int
    live: int
    accepted: list[int] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0  # for a plain step: the step
    other_s: float = 0.0  # catching up on plain steps, committing, bookkeeping
    capture_s: float = 0.0
    gammas: list[int] = field(default_factory=list)  # each `accepted` row's own γ when rows differ (serving)


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


class Decoding:
    """One batch being decoded by `forward` (the target), with a drafter if it speculates.

    `eager`: drop finished rows from the caches at once (no CUDA graphs to keep); otherwise when the
    batch can halve to a smaller captured graph. `verifier`: the acceptance rule (default: exact
    greedy or speculative sampling for the batch's sampling parameters). `capture_s`: a callable giving
    the seconds spent capturing CUDA graphs so far (reported per round)."""

    def __init__(self, forward: Forward, batch: Batch, drafter: Drafter | None = None, *, eager: bool = True,
                 verifier: Verifier | None = None, capture_s: Callable[[], float] = lambda: 0.0) -> None:
        if batch.state is None:
            raise ValueError("decode a batch after its prefill")
        if batch.decoded:
            raise ValueError("this batch was decoded already; to decode a prefilled batch several ways, decode "
                             "copies of it (batch.fork())")
        batch.decoded = True
        self.forward, self.batch, self.drafter, self.eager = forward, batch, drafter, eager
        self.cache: DenseKVCache = batch.cache
        self.state = batch.state
        self.params, self.stopper = batch.params, batch.stopper
        self.generator = batch.generator()
        self.verifier = verifier or verifier_for(self.params, self.generator)
        self.capture_s = capture_s
        self._drop_finished()

    @property
    def done(self) -> bool:
        return not self.state.live()

    def view(self) -> BatchView:
        return self.state.view(self.params.max_new_tokens)

    @torch.inference_mode()
    def step(self, gamma: int) -> RoundReport:
        """One round at `gamma` (0: a plain step)."""
        bound = 0 if self.drafter is None else min(self.batch.max_gamma, self.drafter.max_gamma)
        if not 0 <= gamma <= bound:
            raise ValueError(f"γ = {gamma} is outside 0 … {bound}: this batch and its draft cache were allocated "
                             f"for rounds of at most {bound} drafts (SpecConfig's gamma bound; 0 without a drafter)")
        live = len(self.state.live())
        captured = self.capture_s()
        t0 = time.perf_counter()
        if gamma == 0:
            new = self._plain_step()  # ends with a device read: the host clock is exact
            seconds = time.perf_counter() - t0
            report = RoundReport(0, live, [], new, seconds, verify_s=seconds)
        else:
            report = self._round(gamma, live)
        self._drop_finished()
        seconds = time.perf_counter() - t0
        return replace(report, seconds=seconds, capture_s=self.capture_s() - captured)

    def _drop_finished(self) -> None:
        self.state.refresh_active()
        keep = self.state.compaction_plan(self.eager)
        if keep is not None:
            self.state.compact(keep)
            self.cache.compact(keep)
            if self.drafter is not None:
                self.drafter.compact(keep)

    def _extend(self, new: list[list[int]]) -> int:
        """Apply the stop rules to each live row's new tokens; returns how many tokens were appended."""
        added = 0
        for i in self.state.live():
            out = self.state.outputs[i]
            before = len(out.token_ids)
            self.stopper.extend(out, new[i])
            added += len(out.token_ids) - before
        return added

    def _plain_step(self) -> int:
        """One target step; a drafter, if any, is told the pending token is committed."""
        state = self.state
        lengths = state.lengths
        logits = self.forward(state.pending(), state.positions(lengths[:, None]), self.cache)[:, 0]
        nxt = next_tokens(logits, self.params, self.generator)
        if self.drafter is not None:
            self.drafter.commit(lengths, torch.zeros_like(lengths), 0, self.cache, state.active)
        state.commit(nxt[:, None], torch.ones_like(nxt))
        bad = logits.isnan().any(-1) & state.active
        host = torch.stack([nxt, bad.long()], 1).tolist()  # the step's one device read
        check_finite([row[1] for row in host], "in a decoding step")
        return self._extend([[row[0]] for row in host])

    def _round(self, gamma: int, live_rows: int) -> RoundReport:
        """Draft γ tokens, verify them in one target forward, commit each row's accepted prefix."""
        state, drafter = self.state, self.drafter
        assert drafter is not None
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
        accepted, nxt = self.verifier(drafts, draft_probs, logits)
        clock.mark()
        drafter.commit(lengths, accepted, gamma, self.cache, state.active)
        new = torch.cat([drafts, nxt[:, None]], dim=1).scatter_(1, accepted[:, None], nxt[:, None])
        state.commit(new, accepted + 1)
        bad = logits.isnan().flatten(1).any(1) & state.active
        host = torch.cat([accepted[:, None], new, bad[:, None].long()], dim=1).tolist()  # the round's one device read
        clock.mark()
        check_finite([row[-1] for row in host], "in verification")
        catch_up_s, draft_s, verify_s, rest_s = clock.seconds()
        live = state.live()
        accepted_list = [host[i][0] for i in live]
        for i, k in zip(live, accepted_list):
            state.outputs[i].spec.record(gamma, k)
        added = self._extend([row[1 : row[0] + 2] for row in host])  # the flag column is never reached
        # catching up on plain steps is the price of switching back to drafting, not of a draft step
        return RoundReport(gamma, live_rows, accepted_list, added, draft_s=draft_s, verify_s=verify_s,
                           other_s=rest_s + catch_up_s)

