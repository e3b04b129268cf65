"""Per request and round, who drafts and how much: the model draft (γ from `RequestGamma`), a model-free
proposal (prompt lookup or suffix matching over the request's own text), or nothing.

The engine asks `DraftChoice.choose(requests)` before each step; it returns each request's number of draft
positions to verify and sets `request.draft` (the source, and a proposal's tokens). A request drafts as its
own `RequestSpec.method` says, else as the engine's setting:
- "self": the model draft, γ as `RequestGamma` chooses it;
- "ngram" / "suffix": its proposer's proposal of at most its bound (the engine's γ bound, or its own γ) —
  whatever the proposer found, nothing when nothing matches (a plain step);
- "hybrid": the proposal cut to the round's width, the model draft at γ, or a plain step: the round's width
  and draft steps chosen for the batch to commit the most tokens per unit of time (`spec/hybrid.py`
  `choose_batch`: the verification is padded to its widest row), from T_T, T_D and T_V(n) of the batch as it
  is (calibrated by the measured steps when γ is automatic), the measured matching time, and each
  request's acceptance per source, learned from its rounds (`observe`).
Under tensor parallelism (`deterministic`) the choice uses the cost model's predictions only and no
measured time, so every rank makes the same choice from the same committed tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from magicdec.costmodel.policy import AutoGamma, RequestGamma, StepReport
from magicdec.costmodel.steps import CostModel
from magicdec.spec.hybrid import SELF, MatchCost, RoundCosts, choose_batch
from magicdec.spec.lookup import Draft, Proposal

LOOKUP_METHODS = ("ngram", "suffix")


class DraftChoice:
    def __init__(self, model: RequestGamma | None, bound: int, method: str, cost: CostModel | None = None,
                 deterministic: bool = False) -> None:
        """`model`: the model draft's γ policy (None: no model draft); `bound`: the engine's γ bound; `method`:
        the engine's ("none", "self", "ngram", "suffix" or "hybrid"); `cost`: the cost model the hybrid choice
        weighs with when the γ policy has none of its own (a fixed γ)."""
        self.model, self.bound, self.method, self.cost = model, bound, method, cost
        self.deterministic = deterministic
        self.match = MatchCost()

    def method_of(self, r: Any) -> str:
        """What the request drafts with: its own method, else the engine's; "none" when its γ is 0."""
        if r.spec.gamma == 0:
            return "none"
        return r.spec.method or self.method

    def choose(self, requests: Any) -> list[int]:
        methods = [self.method_of(r) for r in requests]
        gammas = self.model.choose(requests) if self.model is not None else [0] * len(requests)
        t0 = time.perf_counter()
        proposals: list[Proposal | None] = []
        for r, m in zip(requests, methods):
            k = min(r.spec.gamma or self.bound, r.remaining - 1)
            proposals.append(r.proposer.propose(k) if m in (*LOOKUP_METHODS, "hybrid") and k > 0 else None)
        asked = sum(p is not None for p in proposals)
        if asked:
            self.match.record(time.perf_counter() - t0, asked)
        costs = self._costs(requests) if "hybrid" in methods else None
        out = []
        for r, m, g, prop in zip(requests, methods, gammas, proposals):
            draft, n = Draft(), 0
            if m == "self" and g:
                draft, n = Draft(SELF), g
            elif m in LOOKUP_METHODS and prop is not None and len(prop):
                draft, n = Draft(prop.source, tuple(prop.tokens)), len(prop)
            r.draft = draft
            out.append(n)
        hybrid = [i for i, m in enumerate(methods) if m == "hybrid"]
        if hybrid and costs is not None:
            # one choice for the hybrid requests, around the width and draft steps the others impose
            others = [i for i in range(len(requests)) if methods[i] != "hybrid"]
            choices, _ = choose_batch([proposals[i] for i in hybrid], [requests[i].sources for i in hybrid], costs,
                                      [gammas[i] for i in hybrid],
                                      bounds=[max(gammas[i], len(proposals[i] or ())) for i in hybrid],
                                      min_width=max((out[i] for i in others), default=0),
                                      min_steps=max((out[i] for i in others if methods[i] == "self"), default=0))
            for i, c in zip(hybrid, choices):
                requests[i].draft = Draft(SELF) if c.source == SELF else Draft(c.source, c.tokens) if c.n else Draft()
                out[i] = c.n
        return out

    def _costs(self, requests: Any) -> RoundCosts | None:
        """The round's costs in plain steps of this batch (None when there is no cost model)."""
        rows, contexts = len(requests), [r.context for r in requests]
        batch = self.model.batch if self.model is not None else None
        if isinstance(batch, AutoGamma) and not self.deterministic:
            t_target, t_draft, verify = batch.costs(rows, contexts)
        elif isinstance(batch, AutoGamma) or self.cost is not None:
            cost = batch.cost if isinstance(batch, AutoGamma) else self.cost
            assert cost is not None
            t_target, t_draft = cost.t_target(rows, contexts), cost.t_draft(rows, contexts)
            verify: Callable[[int], float] = lambda n: cost.t_verify(rows, contexts, n) if n else t_target  # noqa: E731
        else:
            return None
        match = 0.0 if self.deterministic else self.match.seconds / t_target
        has_model = self.model is not None
        return RoundCosts(lambda n: verify(n) / t_target, t_draft / t_target if has_model else None, match)

    def observe(self, report: StepReport, requests: dict[str, Any]) -> None:
        """After a step: each request's acceptance per source, and the model draft's γ policy."""
        sources = report.sources or ["self" if g else "" for g in report.gammas]
        for rid, g, k, source in zip(report.request_ids, report.gammas, report.accepted, sources):
            r = requests.get(rid)
            if g and source and r is not None:
                r.sources.record(source, g, k)
        if self.model is not None:
            self.model.observe(report)

    def stats(self) -> dict[str, Any]:
        out = self.model.stats() if self.model is not None else {}
        return {**out, "match_s_per_request": self.match.seconds}

