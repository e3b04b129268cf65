"""`magicdec bench trace`: serving a request trace, continuous batching against static batching.

A `Trace` is N requests — prompts of drawn lengths, output lengths drawn too — arriving by a Poisson
process (`rate` requests/s, offsets fixed by the seed) or closed-loop (`concurrency` requests in flight:
the first ones at once, then one more each time one finishes). Every configuration replays the same
trace in real time, one after another on one loaded `LLM`, each through a fresh serving `Engine` (the
one engine core every client runs):

- `plain`: continuous batching without speculation; `self-g<γ>`: with the StreamingLLM self-draft at a
  fixed γ; `auto`: the same with γ chosen per step by the cost model (`Auto()`);
- `static`: static batching emulated on the same engine, with the self-draft at γ auto: batches of
  `batch_size` requests in arrival order (the engine's `max_num_seqs` is the batch size). A batch is
  admitted at once when its last request has arrived and the previous batch is done (the engine idle), and
  every row decodes to the batch's longest output (`max_new_tokens` = the longest; the rows that go on past
  their own output are the batch's waste); a request's tokens are its first `output_len`, and it is
  finished at the last of them. Prompts are prefilled in the engine's chunks, so a batch's first rows may
  decode while its last prompts prefill; no request joins a batch that has started.

Per request: TTFT (first token − arrival), TPOT ((e2e − TTFT) / (output tokens − 1)), e2e (last token
− arrival), ITL (the gaps between successive deliveries of tokens: a step's tokens come together) and
its maximum, the speculation counters. Per configuration: output tokens / makespan (first arrival to
last finish), requests / makespan, mean and p50/p90/p99 of each latency, acceptance, prefix-cache hit
rate, preemptions, the KV-leak check, whether every request's greedy tokens equal the reference
configuration's (the first one run: `plain` when run), and throughput over `plain`'s.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magicdec.cache.blocks import KVLeakError
from magicdec.engine.outputs import Acceptance, StepOutput
from magicdec.llm import LLM
from magicdec.runtime.sampling import SamplingParams
from magicdec.serving import Engine
from magicdec.spec.config import Auto, SpecConfig

CONFIG_KINDS = ("plain", "self", "auto", "static", "ngram", "suffix", "hybrid")
DEFAULT_KINDS = ("plain", "self", "auto", "static")  # the model-free drafters run when asked for
PERCENTILES = (50, 90, 99)
DEFINITIONS = {
    "ttft_s": "first output token's time − the request's (scheduled) arrival",
    "tpot_s": "(e2e − TTFT) / (output tokens − 1)",
    "itl_s": "gaps between successive deliveries of a request's tokens (a step's tokens arrive together)",
    "itl_max_s": "a request's largest inter-token gap",
    "e2e_s": "last output token's time − arrival",
    "output_tokens_per_s": "all requests' output tokens / makespan (first arrival → last finish)",
    "requests_per_s": "requests / makespan",
    "throughput_vs_plain": "output_tokens_per_s / plain's, same trace, same run",
    "decode_tokens_per_s": "output tokens of the steps that ran no prompt chunk / those steps' seconds (static: "
                           "the tokens asked for, not the waste rows'): the speed while everyone decodes",
    "decode_vs_plain": "decode_tokens_per_s / plain's",
    "matches_reference": "every request's greedy tokens equal the reference configuration's (the first one "
                         "run: plain when run)",
    "static": "static batching on the engine: batches of batch_size requests in arrival order (max_num_seqs = "
              "batch_size, γ auto), a batch admitted at once at its last arrival once the previous batch is done, "
              "every row decoding to the batch's longest output; a request's tokens are its first output_len, "
              "finished at the last of them",
}

PromptSource = Callable[[list[int]], list[list[int]]]  # lengths → token-id prompts of exactly those lengths


# ---- the trace --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int
    prompt: list[int]
    output_len: int
    offset: float | None = None  # arrival, seconds after the start (Poisson); None: closed loop


@dataclass(frozen=True, slots=True)
class Trace:
    requests: list[TraceRequest]
    rate: float | None = None
    concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a trace has either a Poisson rate or a closed-loop concurrency")

    def as_dict(self) -> dict[str, Any]:
        return {"requests": len(self.requests), "rate": self.rate, "concurrency": self.concurrency,
                "seed": self.seed, "prompt_lens": [len(r.prompt) for r in self.requests],
                "output_lens": [r.output_len for r in self.requests],
                "offsets_s": None if self.rate is None else [r.offset for r in self.requests]}


def make_trace(prompts: PromptSource, n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], *,
               rate: float | None = None, concurrency: int | None = None, seed: int = 0) -> Trace:
    """`n` requests: prompt and output lengths drawn uniformly from the closed ranges, Poisson arrivals at
    `rate` (the first at 0) or closed-loop `concurrency`; the draws depend on `seed` only."""
    if n < 1:
        raise ValueError(f"a trace needs ≥ 1 request, got {n}")
    for name, (lo, hi) in (("prompt", prompt_len), ("output", output_len)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} lengths must be a range 1 ≤ low ≤ high, got {lo}-{hi}")
    if rate is not None and not rate > 0:
        raise ValueError(f"the arrival rate must be > 0 requests/s, got {rate}")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"the concurrency must be ≥ 1, got {concurrency}")
    rng = random.Random(seed)
    plens = [rng.randint(*prompt_len) for _ in range(n)]
    olens = [rng.randint(*output_len) for _ in range(n)]
    offsets: list[float | None] = [None] * n
    if rate is not None:
        t = 0.0
        for i in range(n):
            offsets[i] = t
            t += rng.expovariate(rate)
    texts = prompts(plens)
    if [len(p) for p in texts] != plens:
        raise ValueError("the prompt source returned prompts of other lengths than asked")
    return Trace([TraceRequest(i, list(p), o, off) for i, (p, o, off) in enumerate(zip(texts, olens, offsets))],
                 rate, concurrency, seed)


# ---- configurations ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TraceConfig:
    name: str  # plain, self-g3, auto, static, ngram, suffix, hybrid
    kind: str  # one of CONFIG_KINDS
    spec: SpecConfig | None

    @property
    def gamma(self) -> str:
        if self.spec is None:
            return "—"
        return "auto" if isinstance(self.spec.gamma, Auto) else str(self.spec.gamma)

    @property
    def continuous(self) -> bool:
        return self.kind != "static"


def trace_configs(kinds: Iterable[str], gammas: Sequence[int] = (3,), budget: int = 256,
                  sinks: int = 4, draft_weights: str = "full") -> list[TraceConfig]:
    """The configurations asked for, in the order plain, self (one per γ), auto, static (the self-draft's
    weights: the target's as they are, or `draft_weights` "int8"), then the model-free drafters: ngram and
    suffix proposing up to 8 tokens, hybrid choosing per request and round between a suffix proposal and the
    self-draft (γ auto up to 8)."""
    kinds = list(kinds)
    bad = [k for k in kinds if k not in CONFIG_KINDS]
    if bad:
        raise ValueError(f"unknown configuration {bad[0]!r}: choose among {', '.join(CONFIG_KINDS)}")
    out = []

    def spec(gamma: int | Auto) -> SpecConfig:
        return SpecConfig(method="self", drafter="streaming", budget=budget, sinks=sinks, gamma=gamma,
                          draft_weights=draft_weights)

    if "plain" in kinds:
        out.append(TraceConfig("plain", "plain", None))
    if "self" in kinds:
        out += [TraceConfig(f"self-g{g}", "self", spec(g)) for g in dict.fromkeys(gammas)]
    if "auto" in kinds:
        out.append(TraceConfig("auto", "auto", spec(Auto())))
    if "static" in kinds:
        out.append(TraceConfig("static", "static", spec(Auto())))
    for lookup in ("ngram", "suffix"):
        if lookup in kinds:
            out.append(TraceConfig(lookup, lookup, SpecConfig(method="self", drafter=lookup, gamma=8)))
    if "hybrid" in kinds:
        out.append(TraceConfig("hybrid", "hybrid", SpecConfig(method="self", drafter="hybrid", budget=budget,
                                                             sinks=sinks, gamma=Auto(max_gamma=8),
                                                             draft_weights=draft_weights)))
    return out


# ---- one configuration's run ------------------------------------------------------------------------------

@dataclass(slots=True)
class RequestResult:
    index: int
    prompt_tokens: int
    arrival: float  # time.monotonic()
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    cached_tokens: int = 0
    preemptions: int = 0
    acceptance: Acceptance = field(default_factory=Acceptance)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        n, ttft, e2e = len(self.token_ids), self.ttft, self.e2e
        return None if n < 2 or ttft is None or e2e is None else (e2e - ttft) / (n - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between successive deliveries (distinct token times)."""
        times = sorted(set(self.token_times))
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def itl_max(self) -> float | None:
        gaps = self.itls
        return max(gaps) if gaps else None


@dataclass(slots=True)
class ConfigRun:
    config: TraceConfig
    start: float  # time.monotonic() of the run's start (the first arrival's reference)
    results: list[RequestResult]
    prefix_queries: int | None = None
    prefix_hits: int | None = None
    leak_error: str | None = None  # None: check_no_leaks passed
    gamma_counts: dict[int, int] = field(default_factory=dict)  # γ → request-rounds
    batches: int | None = None  # static batching: how many batches ran
    decode_s: float = 0.0  # time of steps that ran no prompt chunk
    decode_tokens: int = 0  # output tokens those steps made (static: only the tokens the trace asks for)

    @property
    def makespan(self) -> float:
        return max(r.finished for r in self.results if r.finished is not None) - self.start


class Arrivals:
    """When each request arrives: Poisson offsets, or closed loop (a slot frees when a request finishes)."""

    def __init__(self, trace: Trace, start: float) -> None:
        self.trace, self.start = trace, start
        self.next = 0
        self.slots = [start] * (trace.concurrency or 0)  # closed loop: times slots became free

    def freed(self, when: float) -> None:
        if self.trace.concurrency is not None:
            bisect.insort(self.slots, when)  # the earliest free slot goes to the next request

    def due(self, now: float, limit: int | None = None) -> list[tuple[TraceRequest, float]]:
        """The requests that have arrived by `now` (at most `limit`), with their arrival times."""
        out: list[tuple[TraceRequest, float]] = []
        reqs = self.trace.requests
        while self.next < len(reqs) and (limit is None or len(out) < limit):
            r = reqs[self.next]
            if r.offset is not None:
                at = self.start + r.offset
                if at > now:
                    break
            elif self.slots:
                at = self.slots.pop(0)
            else:
                break
            out.append((r, at))
            self.next += 1
        return out

    def take(self, k: int) -> list[tuple[TraceRequest, float]]:
        """The next `k` requests (fewer in closed loop when fewer slots are free), whenever they arrive."""
        return self.due(math.inf, k)

    @property
    def done(self) -> bool:
        return self.next >= len(self.trace.requests)

    def next_time(self) -> float | None:
        """The next scheduled arrival (Poisson), if any is left."""
        if self.done:
            return None
        off = self.trace.requests[self.next].offset
        return None if off is None else self.start + off


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_engine(llm: LLM, trace: Trace, config: TraceConfig, engine_kwargs: dict[str, Any],
               progress: Callable[[int], None] | None = None, static_batch: int | None = None) -> ConfigRun:
    """Replay `trace` in real time through a fresh `Engine(llm=llm, spec=config.spec, **engine_kwargs)`:
    continuous batching (each request queued when it arrives), or with `static_batch` static batching on the
    same engine (see the module docstring)."""
    if static_batch is not None:
        engine_kwargs = {**engine_kwargs, "max_num_seqs": static_batch}
    engine = Engine(llm=llm, spec=config.spec, **engine_kwargs)
    results: dict[int, RequestResult] = {}
    wanted: dict[str, int] = {}  # request id → the output tokens the trace asks of it
    seen: dict[str, int] = {}  # request id → output tokens delivered so far
    gamma_counts: dict[int, int] = {}
    decode_s, decode_tokens, batches = 0.0, 0, 0
    start = time.monotonic()
    arrivals = Arrivals(trace, start)

    def admit(group: list[tuple[TraceRequest, float]], max_new_tokens: int | None = None) -> None:
        for r, at in group:
            rid = f"r{r.index}"
            params = SamplingParams(max_new_tokens=max_new_tokens or r.output_len, ignore_eos=True)  # greedy
            engine.add_request(r.prompt, params, request_id=rid, arrival=at)
            results[r.index] = RequestResult(r.index, len(r.prompt), at)
            wanted[rid], seen[rid] = r.output_len, 0

    try:
        while not arrivals.done or engine.has_unfinished_requests():
            if static_batch is None:
                admit(arrivals.due(time.monotonic()))
            elif not engine.has_unfinished_requests():  # the previous batch is done: the next one, all at once
                group = arrivals.take(static_batch)
                if not group:
                    raise RuntimeError("static trace driver: no request can arrive (closed loop with no free slot)")
                _sleep_until(max(at for _, at in group))
                admit(group, max(r.output_len for r, _ in group))  # every row decodes to the longest output
                batches += 1
            if not engine.has_unfinished_requests():
                nxt = arrivals.next_time()
                if nxt is None:  # closed loop with nothing in flight cannot happen; guard against a hang
                    raise RuntimeError("trace driver: nothing in flight and no arrival scheduled")
                _sleep_until(nxt)
                continue
            outs = engine.step()
            report = engine.last_step
            useful = 0  # tokens the trace asked for (static batching's rows past their output are waste)
            for out in outs:
                n = seen[out.request_id]
                seen[out.request_id] = n + len(out.new_token_ids)
                useful += min(n + len(out.new_token_ids), wanted[out.request_id]) - min(n, wanted[out.request_id])
                if out.finished:
                    finish(results[int(out.request_id[1:])], out, wanted[out.request_id])
                    arrivals.freed(results[int(out.request_id[1:])].finished)  # type: ignore[arg-type]
            if report is not None and report.prefill_tokens == 0:
                decode_s += report.seconds
                decode_tokens += useful
            for g in report.gammas if report is not None else []:
                gamma_counts[g] = gamma_counts.get(g, 0) + 1
            if progress is not None and useful:
                progress(useful)
        leak = None
        try:
            engine.check_no_leaks()
        except KVLeakError as exc:
            leak = str(exc)
        stats = engine.prefix_cache
        run = ConfigRun(config, start, [results[i] for i in sorted(results)], stats.queries, stats.hits, leak,
                        dict(sorted(gamma_counts.items())), batches if static_batch is not None else None,
                        decode_s, decode_tokens)
    finally:
        engine.close()
        release_memory(llm)
    return run


def finish(res: RequestResult, out: StepOutput, wanted: int) -> None:
    """A finished request's result: its first `wanted` tokens, their times; finished at the last of them."""
    m = out.metrics
    if out.finish_reason in ("abort", "error") or m.finished is None:
        raise RuntimeError(f"request {out.request_id} ended with {out.finish_reason!r}: {out.error}")
    res.token_ids = list(out.token_ids[:wanted])
    res.token_times = list(m.token_times[:wanted])
    res.finished = m.finished if len(out.token_ids) <= wanted else res.token_times[-1]
    res.cached_tokens, res.preemptions = m.cached_tokens, m.preemptions
    res.acceptance = out.spec


def release_memory(llm: LLM) -> None:
    gc.collect()
    if llm.device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(llm: LLM, trace: Trace, configs: Sequence[TraceConfig], engine_kwargs: dict[str, Any]) -> None:
    """One short untimed request per configuration (a throwaway engine: its prefix cache is not reused)."""
    prompt = trace.requests[0].prompt[:256]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    for c in configs:
        kw = {**engine_kwargs, "num_blocks": None, "quiet": True}
        bound = c.spec.gamma_bound if c.spec else 0
        block = kw.get("block_size", 64)
        kw["num_blocks"] = 2 + -(-(len(prompt) + 4 + bound + 1) // block)
        engine = Engine(llm=llm, spec=c.spec, **kw)
        engine.run([prompt], params)
        engine.close()
    release_memory(llm)


# ---- records ----------------------------------------------------------------------------------------------

def digest(tokens: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, tokens)).encode()).hexdigest()[:16]


def request_record(run: ConfigRun, r: RequestResult, matches: bool | None) -> dict[str, Any]:
    rel = run.start
    a = r.acceptance
    return {"type": "request", "config": run.config.name, "kind": run.config.kind, "gamma": run.config.gamma,
            "request": r.index, "prompt_tokens": r.prompt_tokens, "output_tokens": len(r.token_ids),
            "arrival_s": r.arrival - rel, "first_token_s": r.token_times[0] - rel if r.token_times else None,
            "finished_s": None if r.finished is None else r.finished - rel,
            "ttft_s": r.ttft, "tpot_s": r.tpot, "itl_max_s": r.itl_max, "e2e_s": r.e2e,
            "itl_s": r.itls, "deliveries": len(set(r.token_times)),
            "rounds": a.rounds, "draft_tokens": a.draft_tokens, "accepted_tokens": a.accepted_tokens,
            "acceptance_rate": a.acceptance_rate if a.draft_tokens else None,
            "cached_tokens": r.cached_tokens, "preemptions": r.preemptions,
            "tokens_sha1": digest(r.token_ids), "matches_reference": matches}


def distribution(values: Iterable[float | None]) -> dict[str, float | None]:
    xs = np.array([v for v in values if v is not None], dtype=float)
    if not xs.size:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(xs.mean()), **{f"p{p}": float(np.percentile(xs, p)) for p in PERCENTILES}}


def summary_record(run: ConfigRun, mismatched: list[int] | None, plain_tps: float | None,
                   plain_decode: float | None = None) -> dict[str, Any]:
    rs = run.results
    out_tokens = sum(len(r.token_ids) for r in rs)
    span = run.makespan
    acc = Acceptance()
    for r in rs:
        acc.merge(r.acceptance)
    tps = out_tokens / span if span > 0 else None
    dtps = run.decode_tokens / run.decode_s if run.decode_s > 0 else None
    q, h = run.prefix_queries, run.prefix_hits
    return {"type": "summary", "config": run.config.name, "kind": run.config.kind, "gamma": run.config.gamma,
            "budget": run.config.spec.budget if run.config.spec else None,
            "sinks": run.config.spec.sinks if run.config.spec else None,
            "requests": len(rs), "prompt_tokens": sum(r.prompt_tokens for r in rs), "output_tokens": out_tokens,
            "makespan_s": span, "output_tokens_per_s": tps, "requests_per_s": len(rs) / span if span > 0 else None,
            "throughput_vs_plain": tps / plain_tps if tps and plain_tps else None,
            "decode_tokens_per_s": dtps, "decode_vs_plain": dtps / plain_decode if dtps and plain_decode else None,
            "ttft_s": distribution(r.ttft for r in rs), "tpot_s": distribution(r.tpot for r in rs),
            "itl_s": distribution(g for r in rs for g in r.itls), "itl_max_s": distribution(r.itl_max for r in rs),
            "e2e_s": distribution(r.e2e for r in rs),
            "acceptance_rate": acc.acceptance_rate if acc.draft_tokens else None,
            "mean_accepted_tokens": acc.mean_accepted_tokens if acc.rounds else None,
            "rounds": acc.rounds, "draft_tokens": acc.draft_tokens, "accepted_tokens": acc.accepted_tokens,
            "gamma_counts": {str(g): n for g, n in run.gamma_counts.items()},
            "prefix_cache_queries": q, "prefix_cache_hits": h,
            "prefix_cache_hit_rate": (h / q if q else 0.0) if q is not None and h is not None else None,
            "cached_tokens": sum(r.cached_tokens for r in rs), "preemptions": sum(r.preemptions for r in rs),
            "no_leaks": run.leak_error is None, "leak_error": run.leak_error,
            "matches_reference": None if mismatched is None else not mismatched,
            "mismatched_requests": mismatched or [], "batches": run.batches}


# ---- the benchmark ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class TraceResult:
    requests: list[dict[str, Any]]
    summaries: list[dict[str, Any]]
    problems: list[str]  # exactness violations (tokens differing from the reference's), KV leaks

    @property
    def ok(self) -> bool:
        return not self.problems


def run_trace(llm: LLM, trace: Trace, configs: Sequence[TraceConfig], *, engine_kwargs: dict[str, Any] | None = None,
              static_batch: int = 8, warmup: bool = True, write: Callable[[dict[str, Any]], None] | None = None,
              progress: Callable[[str, int, int], None] | None = None,
              say: Callable[[str], None] | None = None) -> TraceResult:
    """Every configuration on `trace`, one after another. `write` gets each record as it is made;
    `progress(config, new_tokens, total_tokens)`; `say` one line per problem, when found. Static batching
    runs in batches of `static_batch` requests."""
    engine_kwargs = dict(engine_kwargs or {})
    if warmup:
        warm_up(llm, trace, configs, engine_kwargs)
    total = sum(r.output_len for r in trace.requests)
    reference: dict[int, list[int]] | None = None
    ref_name: str | None = None
    plain_tps: float | None = None
    plain_decode: float | None = None
    result = TraceResult([], [], [])
    for c in configs:
        tick = (lambda n, c=c: progress(c.name, n, total)) if progress else None
        run = run_engine(llm, trace, c, engine_kwargs, tick, None if c.continuous else static_batch)
        engine_kwargs["quiet"] = True  # the KV-cache line once: every engine gets the same pool
        tokens = {r.index: r.token_ids for r in run.results}
        mismatched: list[int] | None = None
        if reference is None:
            reference, ref_name = tokens, c.name
        else:
            mismatched = [i for i in sorted(tokens) if tokens[i] != reference.get(i)]
        found = []
        if mismatched:
            found.append(f"EXACTNESS VIOLATION: {c.name}: greedy tokens differ from {ref_name}'s for requests "
                         f"{mismatched}")
        if run.leak_error:
            found.append(f"KV LEAK after {c.name}: {run.leak_error}")
        result.problems += found
        recs = [request_record(run, r, None if mismatched is None else r.index not in mismatched)
                for r in run.results]
        summary = summary_record(run, mismatched, plain_tps, plain_decode)
        summary["reference"] = ref_name if mismatched is not None else None
        if c.kind == "plain" and plain_tps is None:
            plain_tps = summary["output_tokens_per_s"]
            summary["throughput_vs_plain"] = 1.0 if plain_tps else None
            plain_decode = summary["decode_tokens_per_s"]
            summary["decode_vs_plain"] = 1.0 if plain_decode else None
        for rec in [*recs, summary]:
            if write is not None:
                write(rec)
        result.requests += recs
        result.summaries.append(summary)
        for line in found if say is not None else []:
            say(line)
    return result


# ---- report -----------------------------------------------------------------------------------------------

def _f(x: float | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "—" if x is None else format(x * scale, fmt)


def _dist(d: dict[str, float | None], scale: float, fmt: str) -> str:
    return " / ".join(_f(d.get(k), fmt, scale) for k in ("mean", "p50", "p90", "p99"))


def gamma_label(s: dict[str, Any]) -> str:
    """γ, and for γ auto how many request-rounds ran at each γ ('auto: 0×49 1×2')."""
    counts = s.get("gamma_counts") or {}
    if s.get("gamma") != "auto" or not counts:
        return str(s.get("gamma"))
    return "auto: " + " ".join(f"{g}×{n}" for g, n in counts.items())


def _yes(x: bool | None) -> str:
    return "—" if x is None else ("yes" if x else "**NO**")


def markdown(head: dict[str, Any], summaries: list[dict[str, Any]]) -> str:
    m, tr = head.get("machine", {}), head.get("trace", {})
    arrivals = (f"Poisson, {tr['rate']} req/s" if tr.get("rate") is not None
                else f"closed loop, concurrency {tr.get('concurrency')}")
    pl, ol = tr.get("prompt_lens") or [0], tr.get("output_lens") or [0]
    lines = [f"Command: `{head.get('command', '?')}`  ",
             f"Date: {head.get('date', '?')}; model: {head.get('model', '?')} ({head.get('dtype', '?')}); "
             f"corpus: {head.get('corpus', '?')}  ",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, "
             f"device {m.get('device', '?')}{', ' + m['gpu'] if m.get('gpu') else ''}  ",
             f"Trace: {tr.get('requests', '?')} requests, {arrivals}; prompts {min(pl)}–{max(pl)} tokens, outputs "
             f"{min(ol)}–{max(ol)} tokens (greedy, EOS ignored); seed {tr.get('seed', '?')}", "",
             "Latencies: mean / p50 / p90 / p99. TTFT and e2e in s, TPOT and ITL in ms.", "",
             "| config | γ | out tok/s | × plain | decode tok/s | × plain | req/s | makespan s | TTFT s | TPOT ms | "
             "ITL ms | ITL max ms | e2e s | acceptance | mean accepted | prefix hit | preempt | = ref | no leaks |",
             "|" + "---|" * 19]
    for s in summaries:
        lines.append("| " + " | ".join([
            s["config"], gamma_label(s), _f(s["output_tokens_per_s"], ".1f"), _f(s["throughput_vs_plain"]),
            _f(s.get("decode_tokens_per_s"), ".1f"), _f(s.get("decode_vs_plain")),
            _f(s["requests_per_s"], ".3f"), _f(s["makespan_s"], ".1f"), _dist(s["ttft_s"], 1, ".2f"),
            _dist(s["tpot_s"], 1e3, ".1f"), _dist(s["itl_s"], 1e3, ".1f"), _dist(s["itl_max_s"], 1e3, ".0f"),
            _dist(s["e2e_s"], 1, ".2f"), _f(s["acceptance_rate"]), _f(s["mean_accepted_tokens"]),
            _f(s["prefix_cache_hit_rate"]), str(s["preemptions"]), _yes(s["matches_reference"]),
            _yes(s["no_leaks"])]) + " |")
    bad = [s for s in summaries if s.get("matches_reference") is False or s.get("no_leaks") is False]
    for s in bad:
        lines.append("")
        if s.get("matches_reference") is False:
            lines.append(f"> **{s['config']}: greedy outputs differ from {s.get('reference')}'s** "
                         f"(requests {s['mismatched_requests']})")
        if s.get("no_leaks") is False:
            lines.append(f"> **{s['config']}: KV blocks leaked**: {s.get('leak_error')}")
    return "\n".join(lines) + "\n"


def plot(requests: list[dict[str, Any]], summaries: list[dict[str, Any]], path: Path) -> Path:
    """TTFT and TPOT per request by configuration (box plots over the points), and output throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["config"] for s in summaries]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, scale, label in ((axes[0], "ttft_s", 1.0, "TTFT (s)"), (axes[1], "tpot_s", 1e3, "TPOT (ms)")):
        data = [[r[key] * scale for r in requests if r["config"] == n and r[key] is not None] for n in names]
        ax.boxplot([d or [math.nan] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        for i, d in enumerate(data, 1):
            ax.scatter([i] * len(d), d, s=8, alpha=0.5, color="k")
        ax.set(ylabel=label, title=f"{label.split()[0]} per request")
    ax = axes[2]
    tps = [s["output_tokens_per_s"] or 0.0 for s in summaries]
    bars = ax.bar(names, tps, color=["grey" if s["kind"] == "plain" else "C0" if s["kind"] != "static" else "C1"
                                     for s in summaries])
    for b, s in zip(bars, summaries):
        if s.get("throughput_vs_plain"):
            ax.annotate(f"×{s['throughput_vs_plain']:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    ax.set(ylabel="output tokens / s (makespan)", title="Output throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: Path, head: dict[str, Any], requests: list[dict[str, Any]],
                 summaries: list[dict[str, Any]]) -> list[Path]:
    out_dir = Path(out_dir)
    table = out_dir / "results.md"
    table.write_text(markdown(head, summaries))
    return [table, plot(requests, summaries, out_dir / "trace.png")]


def read_results(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The header, request records and summaries of a trace results.jsonl."""
    import json

    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    head = next((r for r in lines if r.get("type") == "header"), {})
    return (head, [r for r in lines if r.get("type") == "request"], [r for r in lines if r.get("type") == "summary"])
