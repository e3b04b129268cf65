"""Prometheus metrics under vLLM's names (prefix `vllm:`, label `model_name`), so vLLM dashboards read them.

One `CollectorRegistry` per server (several servers can live in one process). The engine thread updates
everything: after each step the gauges and the engine's counters (as deltas of `Engine.stats` and its
prefix-cache statistics), and for each finished request its latencies and finish reason.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from magicdec.engine.outputs import StepOutput
from magicdec.serving import Engine

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)
FINISH_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        label = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model_name"], registry=registry).labels(**label)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["model_name"], registry=registry).labels(**label)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry).labels(**label)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch (prefilling or decoding).")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be admitted (queued or preempted).")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Share of KV-cache blocks held by requests (1 = full).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded, "
                                     "recomputation after preemption included).")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions (KV recomputed), counted as requests finish.")
        self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Speculative rounds (one per request per round).")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.spec_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted, by position in the draft (0 = first).",
                                             ["model_name", "position"], registry=registry)
        success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                          ["model_name", "finished_reason"], registry=registry)
        self.success = {r: success.labels(model_name=model_name, finished_reason=r) for r in FINISH_REASONS}
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token (from arrival).",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between output tokens, one sample per "
                             "token after the first (tokens of one speculative round: 0 after the first).",
                             ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Per request: (last token - first token) / "
                              "(output tokens - 1).", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Time from arrival to first scheduled.",
                                    LATENCY_BUCKETS)
        self.request_prompt = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation = histogram("vllm:request_generation_tokens", "Output tokens per request.",
                                            TOKEN_BUCKETS)
        self._seen: dict[str, int] = {}
        self._seen_pos: list[int] = []

    def _delta(self, name: str, now: int) -> int:
        d = now - self._seen.get(name, 0)
        self._seen[name] = now
        return d

    def observe_engine(self, engine: Engine) -> None:
        """After a step (engine thread): the gauges, and what the engine's counters gained."""
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_usage.set(engine.kv_cache_usage)
        s, p = engine.stats, engine.prefix_cache
        for metric, name, value in ((self.prompt_tokens, "prompt", s.prompt_tokens),
                                    (self.generation_tokens, "generation", s.generation_tokens),
                                    (self.prefix_queries, "queries", p.queries), (self.prefix_hits, "hits", p.hits),
                                    (self.spec_drafts, "rounds", s.spec.rounds),
                                    (self.spec_draft_tokens, "drafted", s.spec.draft_tokens),
                                    (self.spec_accepted_tokens, "accepted", s.spec.accepted_tokens)):
            d = self._delta(name, value)
            if d > 0:
                metric.inc(d)
        for i, a in enumerate(s.spec.accepted_at):
            if i >= len(self._seen_pos):
                self._seen_pos.append(0)
            d = a - self._seen_pos[i]
            self._seen_pos[i] = a
            child = self.spec_accepted_per_pos.labels(model_name=self.model_name, position=str(i))
            if d > 0:
                child.inc(d)

    def observe_finished(self, out: StepOutput) -> None:
        """A finished request (engine thread): its finish reason and latencies."""
        reason = out.finish_reason or "abort"
        if reason in self.success:
            self.success[reason].inc()
        m = out.metrics
        if m.preemptions:
            self.preemptions.inc(m.preemptions)
        self.request_prompt.observe(len(out.prompt_token_ids))
        self.request_generation.observe(len(out.token_ids))
        if m.first_scheduled is not None:
            self.queue_time.observe(m.first_scheduled - m.arrival)
        if m.finished is not None:
            self.e2e.observe(m.finished - m.arrival)
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        times = m.token_times
        for a, b in zip(times, times[1:]):
            self.itl.observe(b - a)
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))
