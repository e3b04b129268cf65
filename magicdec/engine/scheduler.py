"""The scheduler: which requests advance in the next step, by how much, and in which blocks.

Each step shares one token budget (`max_num_batched_tokens`) between
1. the decoding requests — each one's pending token plus its γ drafts (γ chosen per request by the
   engine's policy, within the speculation's bound: a γ beyond it is refused), taken first so that running
   requests produce a token every step; then
2. prompt chunks of the requests being prefilled (oldest first), then of newly admitted ones.
A prompt is cut into chunks at fixed positions (multiples of `prefill_chunk` from position 0), whatever
else runs, and a chunk is never split: a prompt's prefill is then the same computation whether it runs
alone or beside others (bit-exact outputs on the CPU), and a long prompt never stalls the running
requests for its whole prefill, only for a chunk. One chunk runs each step even if it is larger than the
budget left, so prefill always progresses.

Admission is first come, first served (a waiting request is never overtaken), up to `max_num_seqs`
running requests, and only when the pool can hold the request's prompt (the part not found in the
prefix cache) plus a round's lookahead (and, for a SnapKV draft, the blocks its selection is copied
to). A prefix-cache hit ends where a chunk and a block both end (a multiple of lcm(prefill_chunk,
block_size)), so the rest of the prompt is computed in the chunks it would have alone (bit-exact). A
request's lookup counts in the prefix-cache statistics, and its `cached_tokens` are set, once: at its
first admission (not at each attempt that found no room, nor at a preempted request's recompute).
When a decoding request needs a block for its next round and none is free, the newest running
request is preempted: its blocks go back to the pool (its prompt's
full blocks stay in the prefix cache) and it waits at the head of the queue to be recomputed.

Sliding layers' blocks are released (`ring_windows`: the windows of the pool's sliding groups, see
`PagedKVCache`'s `layer_groups`). Each request holds its blocks for the global layers as above, and for each
sliding group a ring of at most S = ⌈(W + span) / block_size⌉ + 1 blocks (W its window, span the most
positions a request writes in one step: a prompt chunk, a round's lookahead or a 16-token recompute piece,
a request getting one chunk per step), column c of its table in ring[c mod S]: a block is reused only once
every key it holds is older than any query can see (a query at q sees keys > q − W). Admission, growth and
the capacity count both kinds. A ring keeps no prefix, so prefix caching is off for such a pool.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from magicdec.cache.blocks import BlockPool, chain_hashes
from magicdec.engine.request import Request, Status
from magicdec.kernels.cpu import MAX_DECODE_TOKENS
from magicdec.runtime.logprobs import TokenLogprob
from magicdec.spec.config import SpecConfig


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 1024
    prefill_chunk: int = 512
    max_gamma: int = 0  # the most drafts a round may make (0: no speculation)
    enable_prefix_caching: bool = True
    kept_blocks: int = 0  # blocks each request holds privately for its draft's selection (SnapKV)
    ring_windows: tuple[int, ...] = ()  # the window of each sliding group whose blocks are rings (none: kept)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be ≥ 1, got {self.max_num_seqs}")
        if self.prefill_chunk < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("prefill_chunk and max_num_batched_tokens must be ≥ 1 token")
        if self.max_num_batched_tokens < self.max_num_seqs * (self.max_gamma + 1):
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) cannot hold a round of "
                             f"{self.max_num_seqs} requests × (γ {self.max_gamma} + 1) tokens; raise it or lower "
                             "max_num_seqs")


def scheduling_for(base: SchedulerConfig, spec: SpecConfig | None, block_size: int) -> SchedulerConfig:
    """`base` for `spec`'s speculation: its γ bound, and SnapKV's private blocks per request."""
    if spec is not None and spec.drafter == "guided" and spec.budget - spec.recent_window < block_size:
        raise ValueError(f"a guided draft keeps whole blocks of {block_size} tokens beside its window of "
                         f"{spec.recent_window}: --budget must be ≥ {spec.recent_window + block_size}, "
                         f"got {spec.budget}")
    snapkv = spec.n_kept if spec is not None and spec.drafter == "snapkv" else 0
    return replace(base, max_gamma=spec.gamma_bound if spec is not None else 0, kept_blocks=-(-snapkv // block_size))


@dataclass(slots=True)
class Chunk:
    """Tokens [start, end) of a request to put into the cache this step."""

    request: Request
    start: int
    end: int


@dataclass(slots=True)
class Plan:
    decode: list[Request] = field(default_factory=list)
    gammas: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(g + 1 for g in self.gammas) + sum(c.end - c.start for c in self.chunks)


# chooses γ for each decoding request (0: a plain step for it), given them in running order
ChooseGamma = Callable[[Sequence[Request]], list[int]]


@dataclass(slots=True)
class ModelOutput:
    """What a step's forwards produced: per decoding request (in the plan's order) its accepted drafts (None:
    it failed) and the tokens to commit; per prefill chunk that completed a prompt, the first token; each
    failed request's error; where the time went."""

    accepted: list[int | None] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    first: dict[int, int] = field(default_factory=dict)  # index of the chunk in the plan → its first token
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)  # per decoding request (if asked)
    first_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # … per first token (if asked)
    errors: dict[str, BaseException] = field(default_factory=dict)
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    prefill_s: float = 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config, self.pool = config, pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the newest is preempted first
        self.preemptions = 0
        self.remap: list[tuple[int, int, int]] = []  # (sliding group, row block, ring block) for the cache's maps

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out and give its blocks back."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.release(request.held)
        request.blocks, request.kept, request.rings = [], [], []

    @property
    def lookahead(self) -> int:
        return self.config.max_gamma + 1

    def blocks_needed(self, tokens: int) -> int:
        """Blocks a request of `tokens` tokens holds at most: its tokens, a round's lookahead, its kept blocks,
        its rings."""
        n = self.pool.blocks_for(tokens + self.lookahead)
        return n + self.config.kept_blocks + sum(min(s, n) for s in self.ring_sizes)

    @property
    def span(self) -> int:
        """The most positions one request writes in one step (with rings: one chunk per request per step)."""
        return max(self.config.prefill_chunk, self.lookahead, MAX_DECODE_TOKENS)

    @property
    def ring_sizes(self) -> list[int]:
        """Blocks of each sliding group's ring per request (see the module docstring)."""
        P = self.pool.block_size
        return [-(-(w + self.span) // P) + 1 for w in self.config.ring_windows]

    def _ring_growth(self, r: Request, n: int) -> int:
        """Ring blocks r lacks once it holds `n` blocks of its own."""
        if not self.config.ring_windows:
            return 0
        have = r.rings or [[] for _ in self.config.ring_windows]
        return sum(max(min(s, n) - len(ring), 0) for s, ring in zip(self.ring_sizes, have))

    def _grow_rings(self, r: Request, mapped: int, new: list[int]) -> None:
        """Extend r's rings from the blocks `new` (exactly `_ring_growth`'s count) and map the row's blocks from
        column `mapped` on to their ring blocks."""
        if not self.config.ring_windows:
            return
        if not r.rings:
            r.rings = [[] for _ in self.config.ring_windows]
        n = len(r.blocks)
        for g, (s, ring) in enumerate(zip(self.ring_sizes, r.rings), 1):
            take = max(min(s, n) - len(ring), 0)
            ring += new[:take]
            new = new[take:]
            self.remap += [(g, r.blocks[c], ring[c % s]) for c in range(mapped, n)]
        assert not new

    # ---- one step ----------------------------------------------------------------------------------
    def update(self, plan: Plan, output: ModelOutput, now: float) -> list[Request]:
        """Commit what the plan's forwards produced: each decoding request's accepted drafts and next token
        (through its stop rules), each prefill chunk's progress (its prompt blocks offered to the prefix
        cache; the chunk that completes a prompt gives the first token), each failed request's error; finished
        requests leave and free their blocks. Returns the requests that advanced, in the plan's order."""
        advanced: dict[str, Request] = {}
        logprobs = output.logprobs or [None] * len(plan.decode)
        for r, g, k, tokens, lps in zip(plan.decode, plan.gammas, output.accepted, output.tokens, logprobs):
            advanced[r.request_id] = r
            if k is None:
                continue
            if g and r.draft.source == "self":  # the model draft's KV of the pending token and the drafts it fed
                r.draft_seen = r.computed + min(g, k + 1)
            if g:
                r.acceptance.record(g, k)
            r.computed += k + 1
            self._append(r, tokens, now, output, lps)
            r.index(len(r.prompt) + len(r.output))
        for i, chunk in enumerate(plan.chunks):
            r = chunk.request
            advanced[r.request_id] = r
            if r.metrics.first_scheduled is None:
                r.metrics.first_scheduled = now
            r.computed = chunk.end
            self.register(r)
            r.index(chunk.end)
            if not r.to_compute and r.status is Status.PREFILLING:
                r.status = Status.DECODING
            if i in output.first:
                lp = output.first_logprobs.get(i)
                self._append(r, [output.first[i]], now, output, None if lp is None else [lp])
                r.index(len(r.prompt) + len(r.output))
        for rid, error in output.errors.items():
            r = advanced[rid]
            if not r.finished:
                message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                r.finish("error", now, message)
        for r in advanced.values():
            if r.finished:
                self.remove(r)
        return list(advanced.values())

    @staticmethod
    def _append(r: Request, tokens: list[int], now: float, output: ModelOutput,
                logprobs: list[TokenLogprob] | None = None) -> None:
        """Commit tokens through r's stop rules; what its stop rules or text raise is r's own error."""
        try:
            r.append(tokens, now, logprobs)
        except Exception as e:
            output.errors[r.request_id] = e

    def schedule(self, choose: ChooseGamma) -> Plan:
        plan = Plan()
        budget = self.config.max_num_batched_tokens
        decoding = [r for r in self.running if r.status is Status.DECODING]
        gammas = choose(decoding) if decoding else []
        bound = self.config.max_gamma
        for g in gammas:  # the pool's lookahead, the token budget and the draft were set up for this bound
            if not 0 <= g <= bound:
                raise ValueError(f"γ = {g} is outside 0 … {bound}: the engine was set up for rounds of at most "
                                 f"{bound} drafts (SpecConfig's gamma bound; 0 without speculation)")
        for r, g in zip(decoding, gammas):
            if r.status is not Status.DECODING:  # preempted below for an older request
                continue
            need = max(self.pool.blocks_for(r.computed + g + 1) - len(r.blocks), 0)
            rings = self._ring_growth(r, len(r.blocks) + need)
            while need + rings > self.pool.num_free and r.status is Status.DECODING:
                self._preempt(self.running[-1], plan)
            if r.status is not Status.DECODING:
                continue
            if need > 0:
                mapped = len(r.blocks)
                r.blocks += self.pool.allocate(need)
                self._grow_rings(r, mapped, self.pool.allocate(rings))
            plan.decode.append(r)
            plan.gammas.append(g)
            budget -= g + 1
        for r in [r for r in self.running if r.status is Status.PREFILLING]:
            budget = self._chunks(r, budget, plan)
            if budget <= 0:
                return plan
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if not self._admit(self.waiting[0]):
                break  # first come, first served: nobody overtakes the head of the queue
            budget = self._chunks(self.running[-1], budget, plan)
        return plan

    def _chunks(self, r: Request, budget: int, plan: Plan) -> int:
        """Schedule r's next chunks within `budget` (one at least, if nothing else prefills); returns what is left."""
        pos = r.computed + sum(c.end - c.start for c in plan.chunks if c.request is r)
        end = r.computed + r.to_compute
        while pos < end:
            n = self._chunk_end(r, pos) - pos
            if n > budget and plan.chunks or self.config.ring_windows and pos + n - r.computed > self.span:
                break
            plan.chunks.append(Chunk(r, pos, pos + n))
            pos, budget = pos + n, budget - n
            if budget <= 0:
                break
        return budget

    def _chunk_end(self, r: Request, pos: int) -> int:
        """The end of the chunk starting at `pos`: the prompt in chunks at fixed multiples of prefill_chunk;
        output tokens being recomputed after a preemption in decode-shaped pieces (the kernels' numbers)."""
        prompt = len(r.prompt)
        if pos < prompt:
            c = self.config.prefill_chunk
            return min((pos // c + 1) * c, prompt)
        return min(pos + MAX_DECODE_TOKENS, r.computed + r.to_compute)

    def _admit(self, r: Request) -> bool:
        """Give r its blocks (from the prefix cache where it can) if the pool can hold what it needs."""
        cached: list[int] = []
        if self.config.enable_prefix_caching and not r.random_kv and r.prompt_logprobs is None:
            # (a request for its prompt's log-probabilities computes every chunk: it needs their logits)
            c, P = self.config.prefill_chunk, self.pool.block_size
            # only whole prefill chunks are shared (their keys do not depend on what follows them), and never
            # the prompt's last token (its logits give the first output token)
            usable = (len(r.prompt) - 1) // c * c // P
            hashes = self._hashes(r)
            cached = self.pool.match(hashes, usable)
            step = math.lcm(c, P)  # a hit ends on a chunk boundary that is a block boundary
            whole = len(cached) * P // step * step // P
            self.pool.release(cached[whole:])
            cached = cached[:whole]
        need = self.blocks_needed(len(r.prompt) + len(r.output)) - len(cached)
        if need > self.pool.num_free:
            self.pool.release(cached)
            return False
        self.waiting.popleft()
        new = self.pool.allocate(need)
        k = self.config.kept_blocks
        own = self.pool.blocks_for(len(r.prompt) + len(r.output) + self.lookahead) - len(cached)
        r.kept, r.blocks = new[:k], cached + new[k : k + own]
        self._grow_rings(r, 0, new[k + own :])
        r.computed = r.registered = len(cached) * self.pool.block_size
        if not r.admitted:  # counted once: not per failed attempt, nor a preempted request's recompute
            r.admitted = True
            r.metrics.cached_tokens = r.computed
            if self.config.enable_prefix_caching:
                self.pool.record_lookup(len(r.prompt), r.computed)
        r.status = Status.PREFILLING
        self.running.append(r)
        return True

    def _hashes(self, r: Request) -> list[bytes]:
        if r.hashes is None:
            r.hashes = chain_hashes(r.prompt, self.pool.block_size)
        return r.hashes

    def register(self, r: Request) -> None:
        """Offer r's prompt blocks of whole, computed prefill chunks to the prefix cache (never random KV)."""
        if not self.config.enable_prefix_caching or r.random_kv:
            return
        c, P = self.config.prefill_chunk, self.pool.block_size
        done = min(r.computed, len(r.prompt)) // c * c // P
        hashes = self._hashes(r)
        first, end = r.registered // P, min(done, len(hashes))
        if first < end:
            self.pool.register_chain(r.blocks[first:end], hashes[first:end], hashes[first - 1] if first else None,
                                     r.prompt[first * P : end * P])
        r.registered = max(r.registered, done * P)

    def _preempt(self, victim: Request, plan: Plan) -> None:
        self.running.remove(victim)
        self.pool.release(victim.held)
        victim.blocks, victim.kept, victim.rings = [], [], []
        victim.computed, victim.registered, victim.draft_seen = 0, 0, 0
        victim.status = Status.WAITING
        victim.metrics.preemptions += 1
        self.waiting.appendleft(victim)
        self.preemptions += 1
        plan.preempted.append(victim)
        if victim in plan.decode:
            i = plan.decode.index(victim)
            del plan.decode[i], plan.gammas[i]
