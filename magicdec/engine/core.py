"""The serving engine's core: requests that arrive at any time, continuous batching over the paged cache.

`EngineCore.step()` asks the scheduler for a plan, then runs it:
1. decode — one forward over every decoding request: a plain step for those at γ = 0, a speculative
   round for the others (the StreamingLLM self-draft drafts γ_i tokens per request over its sparse view of
   the target's own blocks; one verification forward over [pending, d_1 … d_γi] with ragged lengths,
   shorter rows padded; each request keeps its accepted prefix and the target's next token);
2. prefill — each scheduled chunk as a forward of its own (a prompt's chunks are the same computation
   whatever else runs); the chunk that completes a prompt gives the request its first token;
3. stop rules, streaming deltas, and the end of finished requests (their blocks go back to the pool).
A request's failure is its own: what raises while its row is sampled, verified, drafted for, put through its
stop rules or detokenized (a sampling error, NaN logits in its row only, …) finishes that request with
finish_reason "error" and the message (`StepOutput.error`), frees its blocks, and the step goes on with
the others. Only an engine-wide fault (a batched forward raising, the scheduler, the γ policy) propagates.
On the CPU the kernels are batch-invariant, so a request's tokens do not depend on the others in its
forwards: greedy output equals decoding the request alone, bit for bit, across preemptions and prefix hits.

Who chooses γ is the caller's (`ChooseGamma`, with `observe` fed each step's `StepReport`).

The guided self-draft (`PagedDraft.select` > 0, `drafter="guided"`): the verification forward (and the
plain steps' forward) also returns, per request and logical block, the largest attention probability any
of its queries, heads and layers gave to a slot of the block (`PagedView.scores`); the next draft of the
request reads its first block (the sinks), the `select - 1` best-scored older blocks and its recent window
(`guided_blocks`). With `score_layers="layer"` the scores stay per layer ([layers, B, nb]) and each layer
of the draft reads its own first block, best-scored blocks and the window (a per-layer `PagedView`).
Verification is unchanged, so outputs stay exact.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from magicdec.cache.blocks import BlockPool
from magicdec.cache.paged import PagedKVCache, PagedView
from magicdec.engine.outputs import Acceptance
from magicdec.engine.request import Request, RequestSpec, Status, StepOutput
from magicdec.engine.scheduler import ChooseGamma, Plan, Scheduler, SchedulerConfig
from magicdec.engine.state import NumericalError
from magicdec.engine.step import PhaseClock
from magicdec.kernels.cpu import MAX_DECODE_TOKENS
from magicdec.loading.tokenizer import Tokenizer
from magicdec.model.llama import Transformer
from magicdec.runtime.sampling import SamplingParams, next_tokens, probabilities, sample
from magicdec.spec.snapkv import select_paged
from magicdec.spec.verify import accepted_prefix, verify_sampling


@dataclass(frozen=True, slots=True)
class PagedDraft:
    """Who drafts, over which KV: `model` (the target itself, or a draft model); `pool` None to read the
    target's own blocks (self-speculation: no KV of its own), or a pool of the draft model's shape indexed by
    the same block tables (the draft's own KV: computed with every prefill chunk, and for the drafted tokens);
    a StreamingLLM view (`sinks` first positions and the last `window` ones) or, with window 0, the whole
    context; `vocab_size` the target's when the draft's vocabulary is a shorter prefix of it."""

    model: Transformer
    pool: PagedKVCache | None = None
    sinks: int = 0
    window: int = 0
    vocab_size: int | None = None
    select: int = 0  # guided: blocks kept whole (the first block + the best-scored ones); 0: StreamingLLM
    kept: int = 0  # SnapKV: positions selected per layer and KV head when the prompt is in (0: none)
    observe: int = 32  # … voted for by the prompt's last `observe` queries
    pool_kernel: int = 7  # … smoothed over this many neighbours
    score_layers: str = "max"  # guided: a block's score over the verification's layers, "max", "sum" or "layer"

    def known(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids the draft can embed (beyond a shorter draft vocabulary: its last id; verification stays exact)."""
        return ids.clamp(max=self.model.config.vocab_size - 1) if self.vocab_size else ids


def guided_blocks(scores: Sequence[float], first: int, select: int) -> list[int]:
    """The kept blocks of a guided draft: block 0 (the sinks) and the `select - 1` best-scored blocks among
    1 … first - 1 (older than the window, which starts at block `first`), ties to the more recent; in
    ascending order. Blocks without a score count 0 (so, before any score, the most recent ones). Empty
    when the window starts at block 0."""
    if first <= 0 or select <= 0:
        return []
    cands = sorted(range(1, first), key=lambda c: (scores[c] if c < len(scores) else 0.0, c), reverse=True)
    return [0] + sorted(cands[: select - 1])


@dataclass(frozen=True, slots=True)
class StepReport:
    """One step: per decoding request its γ and accepted drafts; tokens; where the time went."""

    request_ids: list[str]
    gammas: list[int]
    accepted: list[int]
    prefill_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    prefill_s: float = 0.0


@dataclass(slots=True)
class EngineStats:
    """Counters since the engine started (what the server's metrics export)."""

    prompt_tokens: int = 0  # prompt tokens computed (prefix-cache hits excluded, recomputation included)
    generation_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    errors: int = 0  # requests that failed (finish_reason "error")
    steps: int = 0
    spec: Acceptance = field(default_factory=Acceptance)


class EngineCore:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, eos_token_ids: set[int], cache: PagedKVCache,
                 config: SchedulerConfig, draft: PagedDraft | None = None,
                 choose: ChooseGamma | None = None, observe: Callable[[StepReport], None] | None = None,
                 generator: Callable[[SamplingParams], torch.Generator | None] | None = None,
                 max_model_len: int | None = None, sliding_window: int | None = None) -> None:
        self.model, self.tokenizer, self.eos = model, tokenizer, eos_token_ids
        self.cache, self.draft = cache, draft
        self.pool = BlockPool(cache.num_blocks, cache.block_size)
        self.scheduler = Scheduler(config, self.pool)
        self.config = config
        self.choose = choose or (lambda rs: [0] * len(rs))
        self.observe = observe
        self.generator = generator or (lambda p: p.generator(model.device))
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.sliding_window = sliding_window  # the model's; not implemented: longer requests are refused
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._aborted: list[Request] = []
        self.last_report: StepReport | None = None
        self.block_scores: dict[str, list[float]] = {}  # guided drafts: request id → score per logical block
        self.step_errors: dict[str, BaseException] = {}  # the last step's failed requests: id → what they raised

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams, spec: RequestSpec | None = None,
                    request_id: str | None = None, arrival: float | None = None) -> str:
        """Queue a request (checked here, so a bad one is refused before it waits); returns its id."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}: {params!r:.80}")
        if spec is not None and not isinstance(spec, RequestSpec):
            raise TypeError(f"spec must be a RequestSpec (or None), got {type(spec).__name__}: {spec!r:.80}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is in use")
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in 0 … {vocab - 1}")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                             f"tokens, over the model's context of {self.max_model_len}: shorten the prompt or "
                             "lower max_new_tokens")
        if self.sliding_window is not None and total > self.sliding_window:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                             f"positions, but this model attends over a sliding window of {self.sliding_window}, "
                             "which magicdec does not implement; shorten the prompt or lower max_new_tokens")
        need = self.scheduler.blocks_needed(total)
        if need > self.pool.num_blocks:
            P = self.pool.block_size
            raise ValueError(f"this request needs {need} KV blocks ({need * P} tokens) but the cache holds "
                             f"{self.pool.num_blocks} ({self.pool.num_blocks * P} tokens): shorten it or give the "
                             "KV cache more memory")
        if spec is not None and spec.gamma is not None and (not isinstance(spec.gamma, int) or isinstance(
                spec.gamma, bool) or not 0 <= spec.gamma <= self.config.max_gamma):
            raise ValueError(f"a request's γ must be in 0 … {self.config.max_gamma} (the engine's bound), "
                             f"got {spec.gamma}")
        r = Request(rid, list(prompt), params, self.eos, self.tokenizer, self.generator(params), spec, arrival)
        self.requests[rid] = r
        self.scheduler.add(r)
        return rid

    def abort_request(self, request_id: str) -> None:
        """Stop a request now: its blocks are free before the next step; it reports finish_reason "abort"."""
        r = self.requests.get(request_id)
        if r is None or r.finished:
            return
        self.scheduler.remove(r)
        r.finish("abort", time.monotonic())
        self.stats.aborted += 1
        self._aborted.append(r)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def idle(self) -> bool:
        """No request left, and no aborted one whose final output the next step would report."""
        return not (self.has_unfinished_requests() or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule(self.choose)
        advanced: dict[str, Request] = {r.request_id: r for r in self._aborted}
        self._aborted = []
        self.step_errors = {}
        times = (0.0, 0.0, 0.0)
        accepted: list[int | None] = []
        if plan.decode:
            accepted, times = self._decode(plan)
            advanced.update((r.request_id, r) for r in plan.decode)
        t1 = time.perf_counter()
        for chunk in plan.chunks:
            r = chunk.request
            self._prefill(r, chunk.start, chunk.end)
            advanced[r.request_id] = r
        prefill_s = time.perf_counter() - t1
        out = []
        for r in advanced.values():
            if r.finished and r.finish_reason != "abort":
                self.scheduler.remove(r)
                if r.finish_reason == "error":
                    self.stats.errors += 1
                else:
                    self.stats.finished += 1
            out.append(r.delta())
            if r.finished:
                self.requests.pop(r.request_id, None)
                self.block_scores.pop(r.request_id, None)
        self.stats.steps += 1
        new = sum(len(o.new_token_ids) for o in out)
        self.stats.generation_tokens += new
        rounds = [(r.request_id, g, k) for r, g, k in zip(plan.decode, plan.gammas, accepted) if k is not None]
        report = StepReport([i for i, _, _ in rounds], [g for _, g, _ in rounds], [k for _, _, k in rounds],
                            sum(c.end - c.start for c in plan.chunks), new, time.perf_counter() - t0, *times,
                            prefill_s=prefill_s)
        if self.observe is not None and rounds:
            self.observe(report)
        self.last_report = report
        return out

    def _fail(self, r: Request, error: BaseException) -> None:
        """End r (and only r) with finish_reason "error": what its own row raised during this step."""
        if r.finished:
            return
        r.finish("error", time.monotonic(), f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        self.step_errors[r.request_id] = error

    def _table(self, requests: Sequence[Request]) -> torch.Tensor:
        return self.cache.table([r.blocks for r in requests])

    def _prefill(self, r: Request, start: int, end: int) -> None:
        """Put tokens [start, end) of r into the cache; the chunk that completes its prompt samples its first token."""
        if r.metrics.first_scheduled is None:
            r.metrics.first_scheduled = time.monotonic()
        device = self.model.device
        ids = torch.tensor([r.tokens[start:end]], device=device)
        pos = torch.arange(start, end, device=device)[None]
        table = self._table([r])
        index = torch.tensor([[end - start - 1]], device=device)
        logits = self.model(ids, pos, PagedView(self.cache, table), logits_index=index)[0, 0]
        if self.draft is not None and self.draft.pool is not None:  # the draft's own KV of the same tokens
            self.draft.model(self.draft.known(ids), pos, PagedView(self.draft.pool, table), logits_index=index)
            r.draft_seen = end
        r.computed = end
        if end <= len(r.prompt):
            self.stats.prompt_tokens += end - start
        if end == len(r.prompt) and self.draft is not None and self.draft.kept:  # SnapKV: select over the prompt
            d = self.draft
            r.kept_slots = select_paged(self.model, self.cache, r.prompt, r.blocks, r.kept, d.kept, d.window,
                                        d.observe, d.pool_kernel)
        self.scheduler.register(r)
        if r.to_compute:
            return
        r.status = Status.DECODING
        if not r.output:  # the prompt is in: its first token
            try:
                if bool(logits.isnan().any()):
                    raise NumericalError("the model produced NaN logits in the prefill: the weights hold NaN or the "
                                         "dtype overflows; try --dtype float32 or check the checkpoint")
                token = int(next_tokens(logits, r.params, r.generator))
                r.append([token], time.monotonic())
            except Exception as e:
                self._fail(r, e)

    def _decode(self, plan: Plan) -> tuple[list[int | None], tuple[float, float, float]]:
        """One forward over the decoding requests: plain steps and speculative rounds of ragged γ. Returns each
        row's accepted drafts (None: the request failed this step) and the phases' seconds."""
        rows, gammas = plan.decode, plan.gammas
        device = self.model.device
        clock = PhaseClock(device)
        clock.mark()
        B, G = len(rows), max(gammas)
        table = self._table(rows)
        ctx = torch.tensor([r.computed for r in rows], device=device)
        pending = torch.tensor([r.output[-1] for r in rows], device=device)
        g = torch.tensor(gammas, device=device)
        drafts = torch.zeros((B, G), dtype=torch.long, device=device)
        q: list[torch.Tensor | None] = [None] * B
        failed: dict[int, BaseException] = {}  # rows whose own sampling, stop rules or text raised
        if G:
            drafts, q = self._propose(rows, gammas, table, ctx, pending, failed)
        clock.mark()
        offs = torch.arange(G + 1, device=device)
        pos = torch.where(offs <= g[:, None], ctx[:, None] + offs, -1)
        ids = torch.cat([pending[:, None], drafts], 1).masked_fill(pos < 0, 0)
        guided = self.draft is not None and self.draft.select > 0
        layers = self.draft.score_layers if self.draft is not None and guided else "max"
        shape = (self.cache.k.shape[0], *table.shape) if layers == "layer" else tuple(table.shape)
        scores = torch.zeros(shape, dtype=torch.float32, device=device) if guided else None
        view = PagedView(self.cache, table, scores=scores, score_layers=layers)
        logits = self.model(ids, pos, view)  # [B, G + 1, V]
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        k = torch.zeros(B, dtype=torch.long, device=device)
        nxt = torch.zeros(B, dtype=torch.long, device=device)
        if greedy:
            idx = torch.tensor(greedy, device=device)
            target = logits[idx].argmax(-1)
            ok = (drafts[idx] == target[:, :-1]) & (offs[:-1] < g[idx, None])
            kg = accepted_prefix(ok)
            k[idx], nxt[idx] = kg, target.gather(1, kg[:, None])[:, 0]
        for i, r in enumerate(rows):
            if r.params.greedy or i in failed:
                continue
            try:
                if gammas[i] == 0:
                    nxt[i] = sample(probabilities(logits[i, 0], r.params), r.generator)
                else:
                    qi = q[i]
                    assert qi is not None
                    p = probabilities(logits[i : i + 1, : gammas[i] + 1], r.params)
                    ki, ti = verify_sampling(drafts[i : i + 1, : gammas[i]], qi[None], p, r.generator)
                    k[i], nxt[i] = ki[0], ti[0]
            except Exception as e:
                failed[i] = e
        bad = logits.isnan().flatten(1).any(1)
        host = torch.cat([k[:, None], nxt[:, None], bad[:, None].long(), drafts], 1).tolist()  # one device read
        if scores is not None:  # the freshest scores replace the old ones ([nb], or per layer [L][nb])
            if scores.dim() == 3:
                per_layer = scores.tolist()
                for i, r in enumerate(rows):
                    self.block_scores[r.request_id] = [s[i][: len(r.blocks)] for s in per_layer]
            else:
                for r, row in zip(rows, scores.tolist()):
                    self.block_scores[r.request_id] = row[: len(r.blocks)]
        clock.mark()
        now = time.monotonic()
        accepted: list[int | None] = []
        for i, (r, gi, row) in enumerate(zip(rows, gammas, host)):
            if row[2] and i not in failed:
                failed[i] = NumericalError("the model produced NaN logits in verification: the weights hold NaN or "
                                           "the dtype overflows; try --dtype float32 or check the checkpoint")
            if i in failed:
                self._fail(r, failed[i])
                accepted.append(None)
                continue
            ki, ti = row[0], row[1]
            if gi:  # the draft's KV of the pending token and of the accepted drafts it fed is valid
                r.draft_seen = r.computed + min(gi, ki + 1)
            r.computed += ki + 1
            if gi:
                r.acceptance.record(gi, ki)
                self.stats.spec.record(gi, ki)
            accepted.append(ki)
            try:
                r.append(row[3 : 3 + ki] + [ti], now)
            except Exception as e:
                self._fail(r, e)
        clock.mark()
        draft_s, verify_s, other_s = clock.seconds()
        return accepted, (draft_s, verify_s, other_s)

    def _propose(self, rows: Sequence[Request], gammas: list[int], table: torch.Tensor, ctx: torch.Tensor,
                 pending: torch.Tensor, failed: dict[int, BaseException]
                 ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """γ_i draft tokens per request. A draft with KV of its own first feeds what it has not seen (the
        tokens committed since it last drafted: plain steps, a bonus token), in decode-shaped pieces. A row
        whose sampling raises goes into `failed` (and drafts nothing more)."""
        draft = self.draft
        assert draft is not None, "γ > 0 without a drafter"
        device = ctx.device
        B, G = len(rows), max(gammas)
        seen = [min(r.draft_seen, r.computed) if gi and draft.pool is not None else r.computed
                for r, gi in zip(rows, gammas)]
        view = self._draft_view(rows, gammas, table, seen)
        g = torch.tensor(gammas, device=device)
        index = None
        if draft.pool is None:  # reads the target's KV: in step with it
            ids, pos = pending[:, None], ctx[:, None]
        else:
            while True:
                lag = [r.computed - s for r, s in zip(rows, seen)]
                width = min(max(lag) + 1, MAX_DECODE_TOKENS)
                offs = torch.arange(width, device=device)
                start = torch.tensor(seen, device=device)
                pos = torch.where(start[:, None] + offs <= ctx[:, None], start[:, None] + offs, -1)
                pos = torch.where(g[:, None] > 0, pos, -1)
                ids = torch.tensor([(r.tokens + [0] * width)[s : s + width] for r, s in zip(rows, seen)],
                                   device=device).masked_fill(pos < 0, 0)
                if max(lag) + 1 <= MAX_DECODE_TOKENS:
                    index = torch.tensor([[min(n, width - 1)] for n in lag], device=device)
                    break
                self.draft.model(draft.known(ids), pos, view)  # catching up: KV only
                seen = [min(s + width, r.computed) for r, s in zip(rows, seen)]
        out = []
        dists: list[list[torch.Tensor]] = [[] for _ in range(B)]
        for j in range(G):
            if j:
                pos = torch.where(g > j, ctx + j, -1)[:, None]
                index = None
            else:
                pos = torch.where(g[:, None] > 0, pos, -1)
            logits = draft.model(draft.known(ids.masked_fill(pos < 0, 0)), pos, view, logits_index=index)[:, -1]
            nxt = logits.argmax(-1)
            for i, r in enumerate(rows):
                if not r.params.greedy and j < gammas[i] and i not in failed:
                    try:
                        qi = probabilities(logits[i], r.params)
                        nxt[i] = sample(qi, r.generator)
                    except Exception as e:
                        failed[i] = e
                        qi = torch.zeros(logits.shape[-1], device=device)
                    dists[i].append(F.pad(qi, (0, draft.vocab_size - qi.shape[-1])) if draft.vocab_size else qi)
            out.append(nxt)
            ids = nxt[:, None]
        q = [torch.stack(d) if d else None for d in dists]
        return torch.stack(out, 1), q

    def _draft_view(self, rows: Sequence[Request], gammas: list[int], table: torch.Tensor,
                    starts: Sequence[int] | None = None) -> PagedView:
        """The draft's view: its pool (the target's, or its own) through the requests' tables; with a window,
        each request's first block (the sinks) and the blocks of its recent window only — the window of the
        earliest position fed (`starts`: a draft with KV of its own catching up on committed tokens; default
        each request's context); guided with per-layer scores, one read table per layer (each layer's own
        best blocks, then the same window)."""
        assert self.draft is not None
        pool = self.draft.pool or self.cache
        if not self.draft.window:
            return PagedView(pool, table)
        P, sinks, window, select = self.cache.block_size, self.draft.sinks, self.draft.window, self.draft.select
        snap = -(-self.draft.kept // P)  # SnapKV: its kept blocks
        per_layer = bool(select) and self.draft.score_layers == "layer"
        L = self.cache.k.shape[0] if per_layer else 1
        reads: list[list[list[int]]] = [[] for _ in range(L)]  # [layer][row] → pages
        tags: list[list[list[int]]] = [[] for _ in range(L)]  # [layer][row] → logical blocks (-1: none)
        for r, gi, start in zip(rows, gammas, starts if starts is not None else [r.computed for r in rows]):
            first = max(start - window + 1, 0) // P
            last = (r.computed + max(gi, 1) - 1) // P
            window_cols = list(range(first, last + 1))
            for layer in range(L):
                if select:  # guided: `select` kept columns (padded with nothing), then the window's blocks
                    scores = self.block_scores.get(r.request_id, ())
                    if per_layer and scores:
                        scores = scores[layer]
                    kept = guided_blocks(scores, first, select)
                    cols = kept + [-1] * (select - len(kept)) + window_cols
                elif snap:  # SnapKV: its private blocks of selected keys, then the window's blocks
                    cols = [-1] * snap + window_cols
                else:
                    cols = ([0] if sinks and first > 0 else []) + window_cols
                if snap:
                    reads[layer].append(r.kept + [r.blocks[c] for c in window_cols])
                else:
                    reads[layer].append([r.blocks[c] if c >= 0 else self.cache.trash for c in cols])
                tags[layer].append(cols)
        width = max(len(c) for c in tags[0])
        B = len(rows)
        read = self.cache.table([row for layer in reads for row in layer], width).view(L, B, width)
        base = torch.tensor([c + [-1] * (width - len(c)) for layer in tags for c in layer],
                            device=table.device).view(L, B, width)
        offs = torch.arange(P, device=table.device)
        read_pos = torch.where(base[..., None] >= 0, base[..., None] * P + offs, -1).reshape(L, B, -1)
        if snap:  # SnapKV's selected slots: visible to every query (they precede the window)
            for i, r in enumerate(rows):
                read_pos[:, i, : r.kept_slots] = 0
        # guided and SnapKV: the kept blocks' slots are visible whole (up to the query), the rest by the window rule
        n_kept = select * P if select else snap * P if snap else sinks
        if not per_layer:  # one table for every layer
            read, read_pos = read[0], read_pos[0]
        return PagedView(pool, table, read=read, read_pos=read_pos, window=window, sinks=n_kept)
