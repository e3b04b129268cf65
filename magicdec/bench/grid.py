"""The benchmark grid and its runner.

This file owns what a benchmark runs (`Grid`: batch sizes × contexts × speculative configurations) and
how it is measured (`Runner`). Per batch size the prompts are cut once at the longest context and
prefilled stage by stage (`PrefixPrefill`): each shorter context is a prefix of the longest, decoded from
the cache as it stands when the prefill reaches it, so a batch's prompt tokens go through the model once.
At each (batch, context) point every configuration decodes the same prefilled batch (on a copy of its
cache) in interleaved rounds — short warm-up rounds first, then `repeats` timed rounds of plain, cfg1, cfg2, …,
each round starting one configuration later (so that no configuration always runs just after plain, or
last, while the machine's speed drifts) — and the speedup is the median over rounds of plain's decode time
over the configuration's.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.memory import MemoryPlan, kv_cache_bytes
from magicdec.engine.llm import LLM, PrefilledBatch, PromptError
from magicdec.engine.outputs import GenerationResult, RequestOutput
from magicdec.engine.sampling import SamplingParams, next_tokens
from magicdec.engine.state import BatchState, Stopper
from magicdec.spec.config import SpecConfig

WARMUP_TOKENS = 8  # new tokens per sequence in a warm-up run
DRAFTERS = ("streaming", "snapkv", "draft", "draft-full")  # draft: a draft model over a StreamingLLM cache
# The default grid: ≤ 10 minutes on the 2-core development CPU (see docs/benchmarks.md).
QUICK: dict[str, Any] = dict(batches=[1, 4], contexts=[1024, 2048], drafters=["streaming"], budgets=[256, 512],
                             gammas=[2, "auto"], max_new_tokens=32, repeats=2, warmup=1)


def parse_count(text: str) -> int:
    """'4096', '4k' or '1.5K' (k = ×1024) → a positive int."""
    t = text.strip().lower()
    value = float(t[:-1]) * 1024 if t.endswith("k") else float(t)
    if value != int(value) or value < 1:
        raise ValueError(f"expected a positive whole number (optionally with a k suffix = ×1024), got {text!r}")
    return int(value)


def parse_gamma(text: str) -> int | str:
    return "auto" if text.strip() == "auto" else parse_count(text)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One decoding configuration of the grid; drafter None is plain decoding."""

    drafter: str | None = None
    budget: int | None = None
    gamma: int | str | None = None

    @property
    def label(self) -> str:
        if self.drafter is None:
            return "plain"
        budget = "" if self.drafter == "draft-full" else f"-{self.budget}"
        return f"{self.drafter}{budget}-g{self.gamma}"

    def spec(self, draft_model: str | None = None, synthetic: float | None = None) -> SpecConfig:
        if self.drafter is None:
            return SpecConfig()
        method = "draft" if self.drafter.startswith("draft") else "self"
        kind = {"draft": "streaming", "draft-full": "full"}.get(self.drafter, self.drafter)
        return SpecConfig(method=method, drafter=kind, gamma=self.gamma or 3, budget=self.budget or 512,
                          draft_model=draft_model if method == "draft" else None, synthetic_acceptance=synthetic)


PLAIN = BenchConfig()


@dataclass(slots=True)
class Grid:
    batches: list[int] = field(default_factory=lambda: list(QUICK["batches"]))
    contexts: list[int] = field(default_factory=lambda: list(QUICK["contexts"]))
    drafters: list[str] = field(default_factory=lambda: list(QUICK["drafters"]))
    budgets: list[int] = field(default_factory=lambda: list(QUICK["budgets"]))
    gammas: list[int | str] = field(default_factory=lambda: list(QUICK["gammas"]))
    max_new_tokens: int = QUICK["max_new_tokens"]
    repeats: int = QUICK["repeats"]
    warmup: int = QUICK["warmup"]
    corpus_seed: int = 0
    draft_model: str | None = None
    synthetic_acceptance: float | None = None

    def __post_init__(self) -> None:
        bad = [d for d in self.drafters if d not in DRAFTERS]
        if bad:
            raise ValueError(f"unknown drafter {bad[0]!r}; choose from {', '.join(DRAFTERS)}")
        if any(d.startswith("draft") for d in self.drafters) and not self.draft_model:
            raise ValueError("drafter 'draft' needs --draft-model PATH")
        if self.repeats < 1 or self.warmup < 0 or self.max_new_tokens < 2:
            raise ValueError("need repeats ≥ 1, warmup ≥ 0 and max_new_tokens ≥ 2 (the first comes from prefill)")
        for cfg in self.configs():
            cfg.spec(self.draft_model, self.synthetic_acceptance)  # validates budgets and γ early

    def configs(self) -> list[BenchConfig]:
        """The speculative configurations, in order, without duplicates (draft-full has no budget)."""
        out = [BenchConfig(d, None if d == "draft-full" else b, g)
               for d in self.drafters for b in self.budgets for g in self.gammas]
        return list(dict.fromkeys(out))

    @property
    def max_gamma(self) -> int:
        return max([c.spec(self.draft_model).gamma_bound for c in self.configs()], default=0)

    def total_steps(self, peers: Callable[[int], int] = lambda batch: 0) -> int:
        """Progress units: one per prefill stage and decode run, plus `peers(batch)` per point."""
        runs = (self.warmup + self.repeats) * (1 + len(self.configs()))
        return sum(len(self.contexts) * (1 + runs + peers(b)) for b in self.batches)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"configs": [c.label for c in self.configs()]}


class PrefixPrefill:
    """Prefills equal-length prompts up to increasing contexts, handing out a batch at each one.

    The first token at context L is sampled from the logits at position L-1, exactly as a fresh prefill
    of the L-token prefixes would; with L a multiple of the prefill chunk the forwards are the same too."""

    def __init__(self, llm: LLM, prompts: list[list[int]], params: SamplingParams, max_gamma: int) -> None:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("PrefixPrefill takes prompts of equal length")
        self.llm, self.prompts, self.params, self.max_gamma = llm, prompts, params, max_gamma
        rows, longest = len(prompts), len(prompts[0])
        if longest + params.max_new_tokens + max_gamma > llm.config.max_position_embeddings:
            raise PromptError(f"context {longest} + {params.max_new_tokens} new tokens + γ ≤ {max_gamma} exceeds the "
                              f"model's {llm.config.max_position_embeddings} positions; use a shorter context")
        capacity = longest + params.max_new_tokens + max_gamma + 1
        cfg = llm.config
        target = kv_cache_bytes(cfg.n_layers, rows, llm.model.kv_heads, cfg.head_dim, capacity + 1, llm.dtype)
        MemoryPlan(to_allocate={"target KV cache": target, "working copy of the KV cache": target}).check(
            llm.device, llm.memory_budget)
        self.cache = DenseKVCache.for_model(llm.model, rows, capacity)
        self.tokens = torch.zeros((rows, capacity + 2), dtype=torch.long, device=llm.device)
        self.tokens[:, :longest] = torch.tensor(prompts, device=llm.device)
        self.done, self.elapsed = 0, 0.0

    @torch.inference_mode()
    def advance(self, context: int) -> PrefilledBatch:
        if not self.done < context <= len(self.prompts[0]):
            raise ValueError(f"contexts must increase, up to the prompt length: {self.done} → {context}")
        llm, rows, chunk = self.llm, len(self.prompts), self.llm.prefill_chunk
        t0 = time.perf_counter()
        for start in range(self.done, context, chunk):
            width = min(chunk, context - start)
            pos = torch.arange(start, start + width, device=llm.device).expand(rows, width)
            index = torch.full((rows, 1), width - 1, device=llm.device)
            logits = llm.model(self.tokens[:, start : start + width], pos, self.cache, logits_index=index)[:, 0]
        first = next_tokens(logits, self.params, self.params.generator(llm.device))
        self.elapsed += time.perf_counter() - t0
        self.done = context
        tokens = self.tokens.clone()
        tokens[:, context:] = 0
        tokens[:, context] = first
        stopper = Stopper(llm.tokenizer, self.params, llm.eos_token_ids)
        outputs = [RequestOutput(i, p[:context]) for i, p in enumerate(self.prompts)]
        for out, tok in zip(outputs, first.tolist()):
            stopper.extend(out, [tok])
        lengths = torch.full((rows,), context, device=llm.device)
        return PrefilledBatch(self.cache, BatchState(outputs, tokens, lengths), [context] * rows, self.params,
                              stopper, self.elapsed, True, self.max_gamma)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure(runs: list[GenerationResult]) -> dict[str, Any]:
    """Decode timings of repeated runs, from the median decode time (every run decodes the same number of
    tokens). The first token comes from prefill, so a run decodes generated - batch tokens; per-token
    latency is decode time over the tokens of one sequence."""
    rows, tokens = runs[0].stats.batch, runs[0].stats.generated_tokens - runs[0].stats.batch
    decode = [r.stats.decode_s for r in runs]
    median = _median(decode)
    return {"decode_tokens": tokens, "decode_s": median, "decode_s_all": decode, "tokens_per_s": tokens / median,
            "latency_s": median * rows / tokens}


def summarize(cfg: BenchConfig, runs: list[GenerationResult], plain: list[GenerationResult],
              synthetic: float | None) -> dict[str, Any]:
    """One record's measurements: timings, acceptance, γ chosen and the speedup over plain."""
    rec: dict[str, Any] = {"config": cfg.label, "drafter": cfg.drafter or "plain", "budget": cfg.budget,
                           "gamma": cfg.gamma, **measure(runs)}
    if cfg.drafter is None:
        return rec
    s = runs[0].stats
    ratios = [p.stats.decode_s / r.stats.decode_s for p, r in zip(plain, runs)]
    # the same ratio over the rounds in which every sequence was still generating (no tail of sequences
    # that accepted less finishing their last tokens), the rate a server keeping its batch full sees
    steady = [r.stats.steady_tokens_per_s / p.stats.steady_tokens_per_s for p, r in zip(plain, runs)
              if p.stats.steady_tokens_per_s and r.stats.steady_tokens_per_s]
    ours = [[o.token_ids for o in r.outputs] for r in runs]
    drafted = s.draft_tokens > 0  # gamma="auto" may choose γ = 0 (plain steps) throughout
    histories = [r.stats.gamma_history for r in runs]
    rec.update(acceptance_rate=s.acceptance_rate if drafted else None,
               mean_accepted_tokens=s.mean_accepted_tokens if drafted else None,
               draft_s=_median([r.stats.draft_s for r in runs]), verify_s=_median([r.stats.verify_s for r in runs]),
               draft_prefill_s=_median([r.stats.draft_prefill_s for r in runs]),
               gamma_history=s.gamma_history, gamma_histories=histories, gamma_counts=_mean_counts(histories),
               alpha_estimate=s.extra.get("alpha_estimate"), speedup=_median(ratios), speedup_min=min(ratios),
               speedup_max=max(ratios), speedups=ratios, steady_speedup=_median(steady),
               matches_plain=None if synthetic is not None else all(
                   t == [o.token_ids for o in plain[0].outputs] for t in ours))
    return rec


def _mean_counts(histories: list[list[int]]) -> dict[int, float]:
    """Rounds per run at each γ, averaged over the runs (auto's choices differ from run to run)."""
    total = Counter(g for h in histories for g in h)
    return {g: round(n / len(histories), 1) for g, n in sorted(total.items())}


Peers = Callable[[list[list[int]], int], list[dict[str, Any]]]  # (prompts, max_new_tokens) → peer records


def peer_steps(peers: Peers | None, batch: int) -> int:
    """Progress units a peer call takes (its `steps(batch)` if it has one)."""
    steps = getattr(peers, "steps", None)
    return steps(batch) if steps else (1 if peers else 0)


@dataclass(slots=True)
class Runner:
    llm: LLM
    grid: Grid
    prompts: Callable[[int, int, int], list[list[int]]]  # (batch, context, seed) → token-id prompts
    peers: Peers | None = None
    progress: Callable[[int, str], None] = lambda n, desc: None  # (steps done, what is running)

    def run(self) -> Iterator[dict[str, Any]]:
        """One record per (batch, context, configuration) and per peer, as each point completes."""
        g = self.grid
        params = SamplingParams(max_new_tokens=g.max_new_tokens, ignore_eos=True)
        configs = [PLAIN, *g.configs()]
        pairs = [(c, c.spec(g.draft_model, g.synthetic_acceptance)) for c in configs]
        for batch in g.batches:
            prompts = self.prompts(batch, max(g.contexts), g.corpus_seed)
            pre = PrefixPrefill(self.llm, prompts, params, g.max_gamma)
            for context in sorted(g.contexts):
                self.progress(0, f"B={batch} L={context}: prefill")
                prefilled = pre.advance(context)
                self.progress(1, f"B={batch} L={context}")
                runs: dict[str, list[GenerationResult]] = {c.label: [] for c in configs}
                warm = self._short(prefilled)
                for rnd in range(g.warmup + g.repeats):
                    if rnd == g.warmup:
                        _share_work(warm, prefilled)
                    shift = rnd % len(pairs)  # each round starts one configuration later
                    for cfg, spec in pairs[shift:] + pairs[:shift]:
                        result = self.llm.decode(prefilled if rnd >= g.warmup else warm, spec)
                        if rnd >= g.warmup:
                            runs[cfg.label].append(result)
                        self.progress(1, f"B={batch} L={context} {cfg.label}")
                point = {"type": "point", "engine": "magicdec", "batch": batch, "context": context,
                         "prefill_s": prefilled.prefill_s, "max_new_tokens": g.max_new_tokens, "repeats": g.repeats,
                         "synthetic": g.synthetic_acceptance is not None,
                         "synthetic_acceptance": g.synthetic_acceptance}
                records = [point | summarize(c, runs[c.label], runs["plain"], g.synthetic_acceptance)
                           for c in configs]
                peers = []
                _share_work(None, prefilled)  # free the working copy of the cache before the peers run
                if self.peers:
                    self.progress(0, f"B={batch} L={context}: peers")
                    peers = self.peers([p[:context] for p in prompts], g.max_new_tokens)
                    self.progress(peer_steps(self.peers, batch), f"B={batch} L={context}")
                yield from _join_peers(records, peers, runs["plain"][0], point)
        self.progress(0, "done")

    def _short(self, prefilled: PrefilledBatch) -> PrefilledBatch:
        """The same batch stopping after WARMUP_TOKENS: warm-up rounds exercise every code path and shape
        of the point at a fraction of the cost."""
        params = replace(prefilled.params, max_new_tokens=min(WARMUP_TOKENS, prefilled.params.max_new_tokens))
        return replace(prefilled, params=params, stopper=Stopper(self.llm.tokenizer, params, self.llm.eos_token_ids))


def _share_work(source: PrefilledBatch | None, target: PrefilledBatch) -> None:
    """Hand the warm-up batch's working copy of the cache (the buffer decodes run on, where the engine
    keeps one) to `target`, or drop target's: two views of one point never hold two copies."""
    if hasattr(target, "work"):
        target.work = getattr(source, "work", None)


def _join_peers(records: list[dict[str, Any]], peers: list[dict[str, Any]], plain: GenerationResult,
                point: dict[str, Any]) -> list[dict[str, Any]]:
    """Peer records get the point's keys and whether their tokens equal our plain decoding's; our records
    get our throughput over each measured peer's ("over_peers")."""
    ours = [o.token_ids for o in plain.outputs]
    out = []
    for peer in peers:
        tokens = peer.pop("token_ids", None)
        rec = point | {"engine": "hf", "prefill_s": None, "synthetic": False, "synthetic_acceptance": None} | peer
        if tokens is not None:
            rec["matches_plain"] = tokens == ours
            rec["first_mismatch"] = [next((i for i, (a, b) in enumerate(zip(t, o)) if a != b), None)
                                     for t, o in zip(tokens, ours)]
        out.append(rec)
    measured = {p["config"]: p["tokens_per_s"] for p in out if p.get("tokens_per_s")}
    for rec in records:
        rec["over_peers"] = {name: rec["tokens_per_s"] / tps for name, tps in measured.items()}
    return records + out
