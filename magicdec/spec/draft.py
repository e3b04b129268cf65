"""Who drafts over which KV, and the draft loop of a speculative round, over the engine's paged cache.

A `DraftSetup` says who drafts — the target itself (its weights, or quantized), or a separate draft model —
and over which KV: the target's own blocks (a self-draft, no KV of its own: its keys for the drafted
tokens go into the target's blocks past the committed context, where the verification overwrites them), or
a pool of its own indexed by the same block tables (a draft model, or a self-draft with `kv_source="own"`:
its KV computed with every prefill chunk and for the tokens it drafts), read whole or through a sparse
view (`spec/views.py`: StreamingLLM, guided, SnapKV).

`Drafter` runs it for the engine: `prefill` (a draft with KV of its own takes every prefill chunk too),
`after_prompt` (SnapKV: select the prompt's keys into the request's private blocks), `propose` (γ_i tokens
per decoding request, greedy or sampled with the request's own parameters, after catching up on the tokens
a draft with KV of its own has not seen), and the guided view's block scores, which the verification
forward reports and the next draft reads (`scores_for`, `keep_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from magicdec.cache.paged import PagedKVCache, PagedView
from magicdec.kernels.cpu import MAX_DECODE_TOKENS
from magicdec.model.llama import Transformer
from magicdec.runtime.grammar import GrammarState
from magicdec.runtime.graphs import GraphRunner
from magicdec.runtime.penalties import TokenHistory, processed
from magicdec.runtime.sampling import SamplingParams, probabilities, sample
from magicdec.spec.snapkv import select_paged
from magicdec.spec.views import draft_view


class Drafting(Protocol):
    """What the drafter reads of a request (the engine's `Request`)."""

    request_id: str
    params: SamplingParams
    generator: torch.Generator | None
    computed: int
    draft_seen: int
    kept: list[int]
    kept_slots: int
    scores: torch.Tensor | None
    history: TokenHistory | None  # its penalties' token counts (None: no penalties, bias or min_tokens)
    grammar: GrammarState | None  # its structured output's matcher

    def token_slice(self, start: int, end: int) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class DraftSetup:
    """Who drafts, over which KV: `model` (the target itself, quantized, or a draft model); `own_kv`: a pool of
    its own (else the target's blocks); a sparse view with the `window` most recent positions (0: the whole
    context) and `sinks` first positions; `vocab_size` the target's when the draft's vocabulary is a shorter
    prefix of it; guided: `select` whole blocks kept (the first + the best-scored) by the verification's
    block scores pooled as `score_layers` ("max", "sum" or "layer"); SnapKV: `kept` positions selected per
    layer and KV head when the prompt is in, voted for by its last `observe` queries smoothed over
    `pool_kernel` neighbours."""

    model: Transformer
    own_kv: bool = False
    sinks: int = 0
    window: int = 0
    vocab_size: int | None = None
    select: int = 0
    kept: int = 0
    observe: int = 32
    pool_kernel: int = 7
    score_layers: str = "max"

    def known(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids the draft can embed (beyond a shorter draft vocabulary: its last id; verification stays exact)."""
        return ids.clamp(max=self.model.config.vocab_size - 1) if self.vocab_size else ids


class Drafter:
    def __init__(self, setup: DraftSetup, target: PagedKVCache, forward: GraphRunner,
                 pool: PagedKVCache | None = None) -> None:
        """`forward` runs the draft's model; `pool` its own KV when `setup.own_kv` (made here if not given)."""
        self.setup, self.target, self.forward = setup, target, forward
        if setup.own_kv and pool is None:
            pool = PagedKVCache.for_model(setup.model, target.num_blocks, target.block_size)
        self.pool = pool if setup.own_kv else None

    @property
    def kv(self) -> PagedKVCache:
        """The pool the draft reads and writes."""
        return self.pool if self.pool is not None else self.target

    # ---- prompts ------------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, pos: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> None:
        """A prefill chunk: a draft with KV of its own computes its KV of the same tokens."""
        if self.pool is not None:
            self.setup.model(self.setup.known(ids), pos, PagedView(self.pool, table), logits_index=index)

    def after_prompt(self, target: Transformer, r: Drafting, prompt: list[int], blocks: list[int]) -> None:
        """The prompt is in: SnapKV selects its keys into the request's private blocks."""
        s = self.setup
        if s.kept:
            r.kept_slots = select_paged(target, self.target, prompt, blocks, r.kept, s.kept, s.window, s.observe,
                                        s.pool_kernel)

    # ---- guided block scores ------------------------------------------------------------------------
    def scores_for(self, table: torch.Tensor) -> torch.Tensor | None:
        """A zeroed buffer for the verification's block scores (guided drafts only)."""
        if not self.setup.select:
            return None
        lead = (self.target.n_layers,) if self.setup.score_layers == "layer" else ()
        return torch.zeros((*lead, *table.shape), dtype=torch.float32, device=table.device)

    @staticmethod
    def keep_scores(rows: Sequence[Drafting], scores: torch.Tensor | None) -> None:
        """The freshest scores replace each request's old ones (a row of the step's buffer: [nb] or [L, nb])."""
        if scores is None:
            return
        for i, r in enumerate(rows):
            r.scores = scores[..., i, :]

    def _batch_scores(self, rows: Sequence[Drafting], nb: int) -> torch.Tensor:
        """The requests' last block scores as one [B, nb] (or [L, B, nb]) tensor; blocks never scored count 0."""
        lead = (self.target.n_layers,) if self.setup.score_layers == "layer" else ()
        out = torch.zeros((*lead, len(rows), nb), dtype=torch.float32, device=self.target.k.device)
        for i, r in enumerate(rows):
            if r.scores is not None:
                n = min(r.scores.shape[-1], nb)
                out[..., i, :n] = r.scores[..., :n]
        return out

    # ---- a round's drafts ---------------------------------------------------------------------------
    def view(self, rows: Sequence[Drafting], table: torch.Tensor, start: list[int], end: list[int]) -> PagedView:
        """The draft's view for forwards querying positions start … end of each row."""
        s, dev = self.setup, table.device
        if not s.window:
            return PagedView(self.kv, table)
        span = max((e - b for b, e in zip(start, end)), default=0)
        first, last = torch.tensor(start, device=dev), torch.tensor(end, device=dev)
        if s.select:
            return draft_view(self.kv, table, first, last, span, window=s.window, select=s.select,
                              scores=self._batch_scores(rows, table.shape[1]))
        if s.kept:
            kept = torch.tensor([r.kept for r in rows], dtype=torch.long, device=dev)
            slots = torch.tensor([r.kept_slots for r in rows], device=dev)
            return draft_view(self.kv, table, first, last, span, window=s.window, kept_pages=kept, kept_slots=slots)
        return draft_view(self.kv, table, first, last, span, window=s.window, sinks=s.sinks)

    def propose(self, rows: Sequence[Drafting], gammas: list[int], table: torch.Tensor, ctx: torch.Tensor,
                pending: torch.Tensor, failed: dict[int, BaseException]
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """γ_i draft tokens per request ([B, max γ]) and, for sampled rows, the draft's distributions [γ_i, V]. A
        draft with KV of its own first feeds what it has not seen (the tokens committed since it last drafted:
        plain steps, a bonus token), in decode-shaped pieces. A row whose sampling raises goes into `failed`."""
        s, dev = self.setup, ctx.device
        B, G = len(rows), max(gammas)
        seen = [min(r.draft_seen, r.computed) if g and self.pool is not None else r.computed
                for r, g in zip(rows, gammas)]
        view = self.view(rows, table, seen, [r.computed + max(g, 1) - 1 for r, g in zip(rows, gammas)])
        g = torch.tensor(gammas, device=dev)
        index = None
        if self.pool is None:  # reads the target's KV: in step with it
            ids, pos = pending[:, None], ctx[:, None]
        else:
            while True:
                lag = [r.computed - n for r, n in zip(rows, seen)]
                width = min(max(lag) + 1, MAX_DECODE_TOKENS)
                offs = torch.arange(width, device=dev)
                start = torch.tensor(seen, device=dev)
                pos = torch.where(start[:, None] + offs <= ctx[:, None], start[:, None] + offs, -1)
                pos = torch.where(g[:, None] > 0, pos, -1)
                ids = torch.tensor([(r.token_slice(n, n + width) + [0] * width)[:width] for r, n in zip(rows, seen)],
                                   device=dev).masked_fill(pos < 0, 0)
                if max(lag) + 1 <= MAX_DECODE_TOKENS:
                    index = torch.tensor([[min(n, width - 1)] for n in lag], device=dev)
                    break
                self.forward(s.known(ids), pos, view)  # catching up: KV only
                seen = [min(n + width, r.computed) for r, n in zip(rows, seen)]
        out = []
        dists: list[list[torch.Tensor]] = [[] for _ in range(B)]
        for j in range(G):
            if j:
                pos = torch.where(g > j, ctx + j, -1)[:, None]
                index = None
            else:
                pos = torch.where(g[:, None] > 0, pos, -1)
            logits = self.forward(s.known(ids.masked_fill(pos < 0, 0)), pos, view, logits_index=index)[:, -1]
            if any(r.history is not None or r.grammar is not None for r in rows):
                logits = logits.to(torch.float32, copy=True)  # the target's rule: committed tokens + drafts[:j]
                for i, r in enumerate(rows):
                    if (r.history is not None or r.grammar is not None) and j < gammas[i] and i not in failed:
                        try:
                            logits[i] = processed(logits[i : i + 1], [int(t[i]) for t in out], r.history,
                                                  r.grammar)[0]
                        except Exception as e:
                            failed[i] = e
            nxt = logits.argmax(-1)
            for i, r in enumerate(rows):
                if not r.params.greedy and j < gammas[i] and i not in failed:
                    try:
                        qi = probabilities(logits[i], r.params)
                        nxt[i] = sample(qi, r.generator)
                    except Exception as e:
                        failed[i] = e
                        qi = torch.zeros(logits.shape[-1], device=dev)
                    dists[i].append(F.pad(qi, (0, s.vocab_size - qi.shape[-1])) if s.vocab_size else qi)
            out.append(nxt)
            ids = nxt[:, None]
        return torch.stack(out, 1), [torch.stack(d) if d else None for d in dists]
