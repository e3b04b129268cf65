"""The model runner: runs a step's plan — the forwards, drafting and sampling — and reports the tokens.

`execute(plan)` builds the inputs of the scheduled work and runs it:
1. decode — one forward over every decoding request: a plain step for those at γ = 0, a speculative round
   for the others (the model drafter drafts γ_i tokens for the requests whose round drafts with it, a
   model-free proposal fills the others' — a one-hot draft distribution for sampled rows; one verification
   forward over
   [pending, d_1 … d_γi] with ragged lengths, shorter rows padded at position −1); greedy rows are verified
   together, sampled rows each with its own parameters and seeded generator (or every row by a `verifier`
   that replaces the acceptance rule: systems benchmarks' synthetic acceptance);
2. prefill — each scheduled chunk as a forward of its own (a prompt's chunks are the same computation
   whatever else runs); the chunk that completes a prompt samples the request's first token.
Decode-shaped forwards go through a `GraphRunner` (CUDA graphs per padded shape on CUDA). What a request's
own row raises (its sampling, NaN logits in its row only) is returned as that request's error; only what
fails for everyone (a batched forward) propagates. The runner reads the device once per round (accepted
counts, tokens, NaN flags). It commits nothing: `Scheduler.update` does.
"""

from __future__ import annotations

import time

import torch

from magicdec.cache.paged import PagedKVCache, PagedView
from magicdec.engine.request import Request
from magicdec.engine.scheduler import ModelOutput, Plan
from magicdec.model.llama import Transformer
from magicdec.runtime.graphs import GraphRunner
from magicdec.runtime.logprobs import token_logprobs
from magicdec.runtime.penalties import processed
from magicdec.runtime.sampling import next_tokens, probabilities, sample
from magicdec.spec.draft import Drafter
from magicdec.spec.onehot import onehot_probs
from magicdec.spec.verify import Verifier, accepted_prefix, verify_sampling


class NumericalError(ValueError):
    """The model's logits hold NaN: greedy decoding would emit token 0 forever."""


NAN = ("the model produced NaN logits {where}: the weights hold NaN or the dtype overflows; try --dtype float32 "
       "or check the checkpoint")


class PhaseClock:
    """Marks phase boundaries without synchronising: CUDA events on CUDA, read once the round's results
    have been read back anyway; the host clock elsewhere."""

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


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, forward: GraphRunner) -> None:
        self.model, self.cache, self.forward = model, cache, forward
        self.drafter: Drafter | None = None
        self.verifier: Verifier | None = None  # None: the exact acceptance rules

    def execute(self, plan: Plan) -> ModelOutput:
        out = ModelOutput()
        if plan.decode:
            self._decode(plan, out)
        t0 = time.perf_counter()
        for i, chunk in enumerate(plan.chunks):
            self._prefill(i, chunk.request, chunk.start, chunk.end, out)
        out.prefill_s = time.perf_counter() - t0
        return out

    def _table(self, requests: list[Request]) -> torch.Tensor:
        return self.cache.table([r.blocks for r in requests])

    def _prefill(self, i: int, r: Request, start: int, end: int, out: ModelOutput) -> None:
        """Put tokens [start, end) of r into the cache; the chunk that completes its prompt samples its first
        token (when it has none yet: after a preemption the output is recomputed, not sampled again)."""
        device = self.model.device
        table = self._table([r])
        if r.random_kv:  # a systems benchmark's prompt: random keys and values, no forward
            self._fill_random(r, start, end)
            if end == r.target_computed and not r.output:
                out.first[i] = r.prompt[-1]
            return
        ids = torch.tensor([r.token_slice(start, end)], device=device)
        pos = torch.arange(start, end, device=device)[None]
        index = torch.tensor([[end - start - 1]], device=device)
        scoring = r.prompt_logprobs is not None and len(r.prompt_logprobs) == start + 1  # (not a recompute)
        if scoring:  # the prompt's log-probabilities: the logits of every position of the chunk
            every = self.model(ids, pos, PagedView(self.cache, table),
                               logits_index=torch.arange(end - start, device=device)[None])[0]
            logits = every[-1]
            assert r.prompt_logprobs is not None
            upto = min(end, len(r.prompt) - 1) - start  # rows predicting prompt tokens start+1 … upto+start
            k = r.params.prompt_logprobs or 0
            r.prompt_logprobs += token_logprobs(every[:upto], r.prompt[start + 1 : start + 1 + upto], k)
        else:
            logits = self.model(ids, pos, PagedView(self.cache, table), logits_index=index)[0, 0]
        if self.drafter is not None:
            self.drafter.prefill(ids, pos, table, index)
            r.draft_seen = end if self.drafter.pool is not None else r.draft_seen
            if end == len(r.prompt):
                self.drafter.after_prompt(self.model, r, r.prompt, r.blocks)
        if end < r.target_computed or r.output:
            return
        try:
            if bool(logits.isnan().any()):
                raise NumericalError(NAN.format(where="in the prefill"))
            constrained = r.history is not None or r.grammar is not None
            scored = processed(logits[None], (), r.history, r.grammar)[0] if constrained else logits
            out.first[i] = int(next_tokens(scored, r.params, r.generator))
            if r.params.logprobs is not None:
                out.first_logprobs[i] = token_logprobs(logits[None], [out.first[i]], r.params.logprobs)[0]
        except Exception as e:
            out.errors[r.request_id] = e

    def _fill_random(self, r: Request, start: int, end: int) -> None:
        """Slots [start, end) of r (and of a draft's own pool) hold random keys and values, as if prefilled:
        step costs do not depend on the values."""
        P = self.cache.block_size
        pools = [self.cache] + ([self.drafter.pool] if self.drafter is not None and self.drafter.pool is not None
                                else [])
        for pos in range(start, end, P):
            n = min(P - pos % P, end - pos)
            page, off = r.blocks[pos // P], pos % P
            for pool in pools:
                for buf in (pool.k, pool.v):
                    buf[:, page, :, off : off + n] = torch.randn_like(buf[:, page, :, off : off + n]) * 0.5
        r.draft_seen = end

    def _decode(self, plan: Plan, out: ModelOutput) -> None:
        """One forward over the decoding requests: plain steps and speculative rounds of ragged γ."""
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
        failed: dict[int, BaseException] = {}  # rows whose own sampling raised
        model = [g if r.draft.source == "self" else 0 for r, g in zip(rows, gammas)]  # the model draft's rows
        if max(model, default=0):
            assert self.drafter is not None, "a model draft without a drafter"
            made, q = self.drafter.propose(rows, model, table, ctx, pending, failed)
            drafts[:, : made.shape[1]] = made
        vocab = self.model.config.vocab_size
        for i, (r, n) in enumerate(zip(rows, gammas)):  # model-free drafts: their proposals, one-hot q
            if n and r.draft.source != "self":
                drafts[i, :n] = torch.tensor(r.draft.tokens[:n], device=device)
                if not r.params.greedy:
                    q[i] = onehot_probs(drafts[i, :n], vocab)
        clock.mark()
        offs = torch.arange(G + 1, device=device)
        pos = torch.where(offs <= g[:, None], ctx[:, None] + offs, -1)
        ids = torch.cat([pending[:, None], drafts], 1).masked_fill(pos < 0, 0)
        scores = self.drafter.scores_for(table) if self.drafter is not None else None
        layers = self.drafter.setup.score_layers if scores is not None and self.drafter is not None else "max"
        logits = self.forward(ids, pos, PagedView(self.cache, table, scores=scores, score_layers=layers))
        k = torch.zeros(B, dtype=torch.long, device=device)
        nxt = torch.zeros(B, dtype=torch.long, device=device)
        if self.verifier is not None:  # a replaced acceptance rule (never beyond a row's own γ)
            k, nxt = self.verifier(drafts, None, logits)
            k = torch.minimum(k, g)
            nxt = logits.argmax(-1).gather(1, k[:, None])[:, 0]
        else:
            self._verify(rows, gammas, drafts, q, penalised(rows, gammas, drafts, logits), k, nxt, failed)
        bad = logits.isnan().flatten(1).any(1)
        host = torch.cat([k[:, None], nxt[:, None], bad[:, None].long(), drafts], 1).tolist()  # one device read
        if self.drafter is not None:
            self.drafter.keep_scores(rows, scores)
        clock.mark()
        for i, (r, row) in enumerate(zip(rows, host)):
            if row[2] and i not in failed:
                failed[i] = NumericalError(NAN.format(where="in verification"))
            if i in failed:
                out.errors[r.request_id] = failed[i]
                out.accepted.append(None)
                out.tokens.append([])
                out.logprobs.append(None)
            else:
                out.accepted.append(row[0])
                out.tokens.append(row[3 : 3 + row[0]] + [row[1]])
                # the target's verification logits at each accepted position (never the draft's)
                out.logprobs.append(None if r.params.logprobs is None else
                                    token_logprobs(logits[i], out.tokens[-1], r.params.logprobs))
        clock.mark()
        out.draft_s, out.verify_s, out.other_s = clock.seconds()

    @staticmethod
    def _verify(rows: list[Request], gammas: list[int], drafts: torch.Tensor, q: list[torch.Tensor | None],
                logits: torch.Tensor, k: torch.Tensor, nxt: torch.Tensor, failed: dict[int, BaseException]) -> None:
        """The exact acceptance rules into k and nxt: greedy rows at once, sampled rows one by one."""
        device = logits.device
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=device)
            target = logits[idx].argmax(-1)
            g = torch.tensor([gammas[i] for i in greedy], device=device)
            ok = (drafts[idx] == target[:, :-1]) & (torch.arange(drafts.shape[1], device=device) < g[:, None])
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


def penalised(rows: list[Request], gammas: list[int], drafts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The verification's logits with each row's penalties, bias, min_tokens and grammar mask applied: position
    j of a row sees its committed tokens and its first j drafts (`processed`); rows without any: unchanged."""
    if all(r.history is None and r.grammar is None for r in rows):
        return logits
    out = logits.to(torch.float32, copy=True)  # (the raw logits give the log-probabilities)
    for i, (r, g) in enumerate(zip(rows, gammas)):
        if r.history is not None or r.grammar is not None:
            out[i, : g + 1] = processed(logits[i, : g + 1], drafts[i, :g], r.history, r.grammar)
    return out
