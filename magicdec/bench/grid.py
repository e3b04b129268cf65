"""The benchmark grid and its runner.

This file owns what a benchmark runs (`Grid`: batch sizes × contexts × speculative configurations) and
how it is measured (`Runner`), on the engine core every client runs. Per batch size the prompts are cut
once at the longest context; at each context (shortest first) a plain run of one token per prompt prefills
the prefixes (`prefill_s`) and leaves them in the prefix cache, so every configuration then decodes the
same prompts from the same warm cache (each run recomputes only its prompts' last partial chunk, and
prefill is excluded from decode time), all admitted at once. Runs are interleaved — short warm-up rounds
first, then `repeats` timed rounds of plain, cfg1, cfg2, …, each round starting one configuration later (so
that no configuration always runs just after plain, or last, while the machine's speed drifts) — and the
speedup is the median over rounds of plain's decode time over the configuration's.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from magicdec.bench.synthetic import synthetic_verifier
from magicdec.engine.core import EngineCore
from magicdec.engine.outputs import GenerationResult
from magicdec.llm import LLM
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import DRAFTERS, LOOKUPS, SpecConfig

WARMUP_TOKENS = 8  # new tokens per sequence in a warm-up run
# The default grid: small enough to run in minutes on a CPU (timings in docs/benchmarks.md).
QUICK: dict[str, Any] = dict(batches=[1, 4], contexts=[1024, 2048], methods=["self"], drafters=["streaming"],
                             budgets=[256, 512], gammas=[2, "auto"], max_new_tokens=32, repeats=2, warmup=1)
PLAIN = SpecConfig()


@dataclass(slots=True)
class Grid:
    batches: list[int] = field(default_factory=lambda: list(QUICK["batches"]))
    contexts: list[int] = field(default_factory=lambda: list(QUICK["contexts"]))
    methods: list[str] = field(default_factory=lambda: list(QUICK["methods"]))
    drafters: list[str] = field(default_factory=lambda: list(QUICK["drafters"]))
    budgets: list[int] = field(default_factory=lambda: list(QUICK["budgets"]))
    gammas: list[int | str] = field(default_factory=lambda: list(QUICK["gammas"]))
    max_new_tokens: int = QUICK["max_new_tokens"]
    repeats: int = QUICK["repeats"]
    warmup: int = QUICK["warmup"]
    corpus_seed: int = 0
    draft_model: str | None = None
    synthetic_acceptance: float | None = None
    draft_weights: list[str] = field(default_factory=lambda: ["full"])  # self-drafts: full and/or int8 weights

    def __post_init__(self) -> None:
        bad = [d for d in self.drafters if d not in DRAFTERS]
        if bad:
            raise ValueError(f"unknown drafter {bad[0]!r}; choose from {', '.join(DRAFTERS)}")
        if any(m not in ("self", "draft") for m in self.methods):
            raise ValueError(f"--spec takes self and/or draft (plain decoding is always measured), got {self.methods}")
        if "draft" in self.methods and not self.draft_model:
            raise ValueError("--spec draft needs --draft-model PATH")
        if self.repeats < 1 or self.warmup < 0 or self.max_new_tokens < 2:
            raise ValueError("need repeats ≥ 1, warmup ≥ 0 and max_new_tokens ≥ 2 (the first comes from prefill)")
        if self.synthetic_acceptance is not None:
            synthetic_verifier(self.synthetic_acceptance)  # validates α early
        if not self.configs():
            raise ValueError(f"no valid speculative configuration among methods {self.methods} × drafters "
                             f"{self.drafters} (snapkv drafts with 'self', full with 'draft')")

    def configs(self) -> list[SpecConfig]:
        """The speculative configurations, in order, without duplicates (a full cache and the model-free drafters
        have no budget, and these run no draft weights); combinations that do not exist (self over a full cache,
        a draft model with snapkv) are skipped."""
        out = []
        for m in self.methods:
            for d in self.drafters:
                if (m, d) in (("self", "full"), ("draft", "snapkv")):
                    continue
                for b in self.budgets:
                    for g in self.gammas:
                        for w in self.draft_weights if m == "self" and d not in LOOKUPS else ["full"]:
                            out.append(SpecConfig(method=m, drafter=d, gamma=g, budget=b, draft_weights=w,
                                                  draft_model=self.draft_model if m == "draft" else None))
        return list({c.label: c for c in out}.values())

    @property
    def max_gamma(self) -> int:
        return max([c.gamma_bound for c in self.configs()], default=0)

    def total_steps(self, peers: Callable[[int], int] = lambda batch: 0) -> int:
        """Progress units: one per prefill stage and decode run, plus `peers(batch)` per point."""
        runs = (self.warmup + self.repeats) * (1 + len(self.configs()))
        return sum(len(self.contexts) * (1 + runs + peers(b)) for b in self.batches)

    def as_dict(self) -> dict[str, Any]:
        return ({k: getattr(self, k) for k in self.__dataclass_fields__}
                | {"gammas": [str(g) for g in self.gammas], "configs": [c.label for c in self.configs()]})


def grid_core(llm: LLM, prompts: list[list[int]], params: SamplingParams, configs: list[SpecConfig]) -> EngineCore:
    """One engine core for a batch's points: every prompt running at once, its pool holding the longest
    prompts' blocks in the prefix cache beside a run's, with room for every configuration's drafts (the
    largest γ; a draft's own KV)."""
    llm.check_context(prompts[:1], params)
    spec = max(configs, key=lambda c: (c.method == "draft" or c.tuning.kv_source == "own", c.gamma_bound))
    lengths = [len(p) + params.max_new_tokens for p in prompts]
    bound = max(c.gamma_bound for c in configs)
    core = llm.core(llm.engine_config(replace(spec, gamma=bound), max_num_seqs=len(prompts),
                                      max_num_batched_tokens=len(prompts) * (bound + 1) + llm.prefill_chunk,
                                      max_model_len=max(lengths), pool_lengths=tuple(lengths * 2)))
    core.set_speculation(None)
    return core


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


def summarize(cfg: SpecConfig, runs: list[GenerationResult], plain: list[GenerationResult],
              synthetic: float | None) -> dict[str, Any]:
    """One record's measurements: timings, acceptance, γ chosen and the speedup over plain."""
    if not cfg.enabled:
        return {"config": "plain", "method": "none", "drafter": "plain", "budget": None, "gamma": None,
                **measure(runs)}
    rec: dict[str, Any] = {"config": cfg.label, "method": cfg.method, "drafter": cfg.drafter,
                           "budget": None if cfg.drafter == "full" else cfg.budget,
                           "gamma": cfg.gamma if isinstance(cfg.gamma, int) else "auto",
                           **measure(runs)}
    s = runs[0].stats
    ratios = [p.stats.decode_s / r.stats.decode_s for p, r in zip(plain, runs)]
    # the same ratio over the rounds in which every sequence was still generating (no tail of sequences
    # that accepted less finishing their last tokens), the rate a server keeping its batch full sees
    rates = [(r.stats.extra.get("steady_tokens_per_s"), p.stats.extra.get("steady_tokens_per_s"))
             for p, r in zip(plain, runs)]
    steady = [ours / base for ours, base in rates if ours and base]
    ours = [[o.token_ids for o in r.outputs] for r in runs]
    drafted = s.acceptance.draft_tokens > 0  # gamma="auto" may choose γ = 0 (plain steps) throughout
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
        g, llm = self.grid, self.llm
        params = SamplingParams(max_new_tokens=g.max_new_tokens, ignore_eos=True)
        warm_params = replace(params, max_new_tokens=min(WARMUP_TOKENS, g.max_new_tokens))
        configs = [PLAIN, *g.configs()]
        synthetic = None if g.synthetic_acceptance is None else synthetic_verifier(g.synthetic_acceptance)
        for batch in g.batches:
            prompts = self.prompts(batch, max(g.contexts), g.corpus_seed)
            core = grid_core(llm, prompts, params, [c for c in configs if c.enabled] or [PLAIN])
            try:
                for context in sorted(g.contexts):
                    ids = [p[:context] for p in prompts]
                    self.progress(0, f"B={batch} L={context}: prefill")
                    core.set_speculation(None)
                    prefill_s = llm.run(core, ids, replace(params, max_new_tokens=1)).stats.prefill_s
                    self.progress(1, f"B={batch} L={context}")
                    runs: dict[str, list[GenerationResult]] = {c.label: [] for c in configs}
                    for rnd in range(g.warmup + g.repeats):
                        shift = rnd % len(configs)  # each round starts one configuration later
                        for cfg in configs[shift:] + configs[:shift]:
                            timed = rnd >= g.warmup  # warm-up runs stop after WARMUP_TOKENS: every path, less time
                            core.set_speculation(cfg if cfg.enabled else None,
                                                 verifier=synthetic if cfg.enabled else None)
                            core.forget_outputs()  # suffix drafts must not replay the last run's outputs
                            result = llm.run(core, ids, params if timed else warm_params)
                            if timed:
                                runs[cfg.label].append(result)
                            self.progress(1, f"B={batch} L={context} {cfg.label}")
                    point = {"type": "point", "engine": "magicdec", "batch": batch, "context": context,
                             "prefill_s": prefill_s, "max_new_tokens": g.max_new_tokens, "repeats": g.repeats,
                             "synthetic": g.synthetic_acceptance is not None,
                             "synthetic_acceptance": g.synthetic_acceptance}
                    records = [point | summarize(c, runs[c.label], runs["plain"], g.synthetic_acceptance)
                               for c in configs]
                    peers = []
                    if self.peers:
                        self.progress(0, f"B={batch} L={context}: peers")
                        peers = self.peers(ids, g.max_new_tokens)
                        self.progress(peer_steps(self.peers, batch), f"B={batch} L={context}")
                    yield from _join_peers(records, peers, runs["plain"][0], point)
            finally:
                core.close()
        self.progress(0, "done")


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
