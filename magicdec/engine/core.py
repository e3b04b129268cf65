"""The engine core: requests that arrive at any time, continuous batching over the paged KV cache.

Built once from an `EngineConfig` (`EngineCore.from_config`); every client — `LLM.generate`, `Engine`,
`magicdec serve`, the benchmarks — drives the same core. One `step()` is three calls:

    plan = scheduler.schedule(policy.choose)     # who advances, by how much, in which blocks; γ per request
    output = runner.execute(plan)                # the forwards: drafts, verification, prefill chunks, sampling
    advanced = scheduler.update(plan, output)    # commit tokens, stop rules, free what finished

then each advanced request's delta is returned and the γ policy observes the step's `StepReport`.
A request's failure is its own: what raises while its row is sampled, verified, drafted for, put through
its stop rules or detokenized finishes that request with finish_reason "error" and the message
(`StepOutput.error`), frees its blocks, and the step goes on with the others. Only an engine-wide fault (a
batched forward raising, the scheduler, the γ policy) propagates. On the CPU the kernels are
batch-invariant, so a request's tokens do not depend on the others in its forwards: greedy output equals
decoding the request alone, bit for bit, across preemptions and prefix hits.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from magicdec.cache.blocks import BlockPool
from magicdec.cache.memory import OutOfMemoryPlan, available_bytes, fmt_bytes, prefill_transient_bytes
from magicdec.cache.paged import PagedKVCache
from magicdec.costmodel.drafts import DraftChoice
from magicdec.costmodel.policy import GammaPolicy, RequestGamma, StepReport
from magicdec.engine.config import EngineConfig
from magicdec.engine.models import ModelSet
from magicdec.engine.outputs import Acceptance, StepOutput
from magicdec.engine.request import Request, RequestSpec
from magicdec.engine.runner import ModelRunner
from magicdec.engine.scheduler import Scheduler, SchedulerConfig, scheduling_for
from magicdec.parallel.tp import agree_min
from magicdec.runtime.grammar import GrammarState, GrammarTokenizer, check_grammar
from magicdec.runtime.graphs import GraphRunner
from magicdec.runtime.penalties import TokenHistory, needs_history
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import DraftTuning, SpecConfig
from magicdec.spec.draft import Drafter, DraftSetup
from magicdec.spec.lookup import Proposer
from magicdec.spec.ngram import NgramProposer
from magicdec.spec.suffix import SuffixProposer, SuffixTrie
from magicdec.spec.verify import Verifier

CPU_KV_SHARE = 0.4  # of the free memory, what a paged KV pool takes by default on the CPU (the rest: prefill, the OS)
CUDA_KV_SHARE = 0.85  # … and on a GPU (after the weights)


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


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What the engine can take: the longest request (prompt + new tokens), the most tokens a request can
    hold in the pool, requests at once, the largest γ."""

    max_model_len: int
    kv_capacity: int
    max_num_seqs: int
    max_gamma: int


def pool_blocks(models: ModelSet, config: EngineConfig, sched: SchedulerConfig, draft_bytes: int,
                max_len: int) -> int:
    """How many KV blocks the pool gets (see `EngineConfig`): refused, with the bytes and the fix, when the
    longest request would not fit alone. Under tensor parallelism every rank gets the smallest any holds."""
    P = config.block_size
    target_bytes = PagedKVCache.bytes_per_block(models.model, P, grouped=bool(sched.ring_windows))
    per_block = target_bytes + draft_bytes
    if config.num_blocks is not None:
        return config.num_blocks
    lengths = list(config.pool_lengths) if config.pool_lengths else [max_len] * config.max_num_seqs
    need = Scheduler(sched, BlockPool(1, P)).blocks_needed  # blocks per request: its own, kept, rings
    want = sum(need(n) for n in lengths)
    memory, transient = config.kv_cache_memory, 0
    if memory is None:
        if models.memory_budget is not None:  # what the weights and one prefill chunk's transients leave
            transient = prefill_transient_bytes(models.model, 1, min(sched.prefill_chunk, max_len), max_len)
            memory = max(models.memory_budget - models.memory_plan().total - transient, 0)
        else:
            share = CUDA_KV_SHARE if models.device.type == "cuda" else CPU_KV_SHARE
            memory = int(available_bytes(models.device) * share)
    blocks = min(memory // per_block, want)
    if models.tp_world > 1:  # every rank's pool the same: the smallest
        blocks = agree_min(models.tp, blocks, models.device)  # type: ignore[arg-type]
    one = need(max(lengths))  # the longest request alone
    if blocks < one:  # the plan names everything the budget must hold: weights, both pools, prefill transients
        plan = models.memory_plan()
        plan.to_allocate["target KV cache"] = one * target_bytes
        if draft_bytes:
            plan.to_allocate["draft KV cache"] = one * draft_bytes
        if transient:
            plan.to_allocate["prefill masks and expanded KV"] = transient
        plan.fix = "use shorter prompts or fewer new tokens"
        plan.check(models.device, models.memory_budget)
        raise OutOfMemoryPlan(f"the KV cache gets {blocks} blocks of {P} tokens ({fmt_bytes(per_block)} each), "
                              f"fewer than the {one} the longest request needs: {plan.fix}, or give the KV cache "
                              "more memory (kv_cache_memory)")
    return blocks


class EngineCore:
    def __init__(self, models: ModelSet, config: EngineConfig, cache: PagedKVCache, sched: SchedulerConfig,
                 max_model_len: int) -> None:
        """Use `from_config`."""
        self.models, self.config, self.cache = models, config, cache
        self.model = models.model
        self.pool = BlockPool(cache.num_blocks, cache.block_size)
        self.scheduler = Scheduler(sched, self.pool)
        self.max_model_len = max_model_len
        self.graphs = GraphRunner(self.model, config.cuda_graphs, pad=config.pad_shapes)
        self.runner = ModelRunner(self.model, cache, self.graphs)
        self._draft_forwards: dict[int, GraphRunner] = {}  # by draft model: its forward and its own KV pool
        self._draft_pools: dict[int, PagedKVCache] = {}
        self._pool_marks: dict[int, int] = {}  # id of a draft pool → `pool.stored` when it was last turned off
        self.spec: SpecConfig | None = None
        self.policy: DraftChoice | None = None
        self.shared_outputs = SuffixTrie()  # recent outputs of every request, for suffix drafts (bounded, LRU)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._aborted: list[Request] = []
        self.last_report: StepReport | None = None
        self._grammar_tokenizer: GrammarTokenizer | None = None

    @classmethod
    def from_config(cls, models: ModelSet, config: EngineConfig) -> EngineCore:
        """A core for `models` as `config` says: its KV pool sized (and allocated) now, its speculation set."""
        model = models.model
        limit = model.config.max_position_embeddings
        max_len = min(config.max_model_len or limit, limit)
        spec = config.spec.fitted(max_len, config.block_size) if config.spec and config.speculating else None
        groups = model.config.layer_groups if config.release_windows else None
        rings = tuple(model.config.layer_windows[g[0]] for g in groups[1:]) if groups else ()
        sched = scheduling_for(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                               config.prefill_chunk, 0, config.enable_prefix_caching and not rings,
                                               ring_windows=rings),
                               spec, config.block_size)
        draft_bytes = 0
        if spec is not None and cls._own_kv(spec):
            draft_bytes = PagedKVCache.bytes_per_block(models.drafting(spec), config.block_size)
        blocks = pool_blocks(models, config, sched, draft_bytes, max_len)
        cache = PagedKVCache.for_model(model, blocks, config.block_size, grouped=bool(rings))
        core = cls(models, config, cache, sched, max_len)
        core.set_speculation(spec)
        return core

    # ---- speculation -------------------------------------------------------------------------------
    @staticmethod
    def _own_kv(spec: SpecConfig) -> bool:
        return spec.method == "draft" or spec.tuning.kv_source == "own"

    def set_speculation(self, spec: SpecConfig | None, *, gamma_policy: GammaPolicy | None = None,
                        verifier: Verifier | None = None) -> None:
        """Make `spec` the engine's speculation (between requests: refused while any is in flight): who drafts
        over which KV (its budget cut to the engine's longest request: `SpecConfig.fitted`), the scheduler's γ
        bound, the γ policy (`gamma_policy`: one batch-wide policy instead of
        the setting's, for experiments); `verifier` replaces the exact acceptance rule (systems benchmarks'
        synthetic acceptance). A draft with KV of its own keeps its pool between settings; turning it on
        empties the prefix cache only if prefixes were cached while it was off (it has no KV of them)."""
        if spec is not None and not isinstance(spec, SpecConfig):
            raise TypeError(f"spec must be a SpecConfig (or None), got {type(spec).__name__}: {spec!r:.80}")
        if self.has_unfinished_requests():
            raise RuntimeError(f"set_speculation: {self.num_running + self.num_waiting} requests are in flight; "
                               "change the speculation once they have finished (or abort them)")
        P = self.cache.block_size
        spec = spec.fitted(self.max_model_len, P) if spec is not None and spec.enabled else None
        sched = scheduling_for(self.scheduler.config, spec, P)
        check_guided_room(spec, P)
        drafter, model_policy, cost, side = None, None, None, spec.model_side if spec is not None else None
        if side is not None:  # a model drafts: the target itself, quantized, or a draft model
            model = self.models.drafting(side)
            window = side.recent_window if side.drafter in ("streaming", "guided", "snapkv") else 0
            vocab = self.model.config.vocab_size
            setup = DraftSetup(
                model, own_kv=self._own_kv(side), sinks=side.sinks if side.drafter == "streaming" else 0,
                window=window, vocab_size=vocab if model.config.vocab_size < vocab else None,
                select=(side.budget - side.recent_window) // P if side.drafter == "guided" else 0,
                kept=side.n_kept if side.drafter == "snapkv" else 0, observe=side.tuning.observe,
                pool_kernel=side.tuning.pool_kernel, score_layers=side.tuning.guided_scores)
            old = self.runner.drafter
            forward = self._draft_forwards.setdefault(
                id(model), self.graphs if model is self.model else GraphRunner(model, self.config.cuda_graphs,
                                                                               pad=self.config.pad_shapes))
            drafter = Drafter(setup, self.cache, forward, self._draft_pools.get(id(model)))
            if drafter.pool is not None:
                self._draft_pools[id(model)] = drafter.pool
                on = old is not None and old.pool is drafter.pool
                if not on and self._pool_marks.get(id(drafter.pool)) != self.pool.stored:
                    self.pool.clear_prefix_cache()  # prefixes were cached while it was off: it has no KV of them
            model_policy = RequestGamma(gamma_policy or self.models.gamma_policy(side, model.config))
            cost = self.models.cost_model(side, model.config)  # what a hybrid request weighs with
        method = "none" if spec is None else spec.drafter if spec.drafter in ("ngram", "suffix", "hybrid") else "self"
        policy = DraftChoice(model_policy, spec.gamma_bound if spec is not None else 0, method, cost,
                             deterministic=self.models.tp_world > 1)
        old = self.runner.drafter
        if old is not None and old.pool is not None and (drafter is None or drafter.pool is not old.pool):
            self._pool_marks[id(old.pool)] = self.pool.stored
        self.spec, self.policy = spec, policy
        self.scheduler.config = sched
        self.runner.drafter, self.runner.verifier = drafter, verifier

    # ---- requests ----------------------------------------------------------------------------------
    @property
    def limits(self) -> EngineLimits:
        c = self.scheduler.config
        rings = sum(self.scheduler.ring_sizes)  # a long request's rings, whole
        capacity = max((self.pool.num_blocks - c.kept_blocks - rings) * self.pool.block_size - (c.max_gamma + 1), 0)
        return EngineLimits(self.max_model_len, capacity, c.max_num_seqs, c.max_gamma)

    def check_request(self, prompt: list[int], params: SamplingParams, spec: RequestSpec | None = None) -> None:
        """Refuse, with the reason and the fix, a request this engine cannot serve (before it waits)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}: {params!r:.80}")
        if spec is not None and not isinstance(spec, RequestSpec):
            raise TypeError(f"spec must be a RequestSpec (or None), got {type(spec).__name__}: {spec!r:.80}")
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in 0 … {vocab - 1}")
        if params.grammar is not None:
            check_grammar(params.grammar)
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name}: token ids must be in 0 … {vocab - 1}")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                             f"tokens, over the model's context of {self.max_model_len}: shorten the prompt or "
                             "lower max_new_tokens")
        need = self.scheduler.blocks_needed(total)
        if need > self.pool.num_blocks:
            P = self.pool.block_size
            raise ValueError(f"this request needs {need} KV blocks ({need * P} tokens) but the cache holds "
                             f"{self.pool.num_blocks} ({self.pool.num_blocks * P} tokens): shorten it or give the "
                             "KV cache more memory")
        bound = self.scheduler.config.max_gamma
        if spec is not None and spec.gamma is not None and (not isinstance(spec.gamma, int) or isinstance(
                spec.gamma, bool) or not 0 <= spec.gamma <= bound):
            raise ValueError(f"a request's γ must be in 0 … {bound} (the engine's bound), got {spec.gamma}")
        if spec is not None and spec.method in ("self", "hybrid") and self.runner.drafter is None:
            raise ValueError(f"speculation method {spec.method!r} drafts with the engine's model draft, and this "
                             "engine has none: start it with --spec self (or --spec draft), or ask for 'ngram' or "
                             "'suffix'")
        if spec is not None and spec.method not in (None, "none") and bound == 0:
            raise ValueError(f"speculation method {spec.method!r}: this engine runs without speculation (γ bound 0): "
                             "start it with --spec self and --gamma")

    def add_request(self, prompt: list[int], params: SamplingParams, spec: RequestSpec | None = None,
                    request_id: str | None = None, arrival: float | None = None, checked: bool = False,
                    random_kv: bool = False) -> str:
        """Queue a request (checked here unless the caller did already, so a bad one is refused before it
        waits); returns its id. `random_kv`: its prompt's keys and values are random instead of prefilled, and
        its first token is its prompt's last (systems benchmarks: step costs do not depend on the values)."""
        if not checked:
            self.check_request(prompt, params, spec)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is in use")
        r = Request(rid, list(prompt), params, self.models.eos_token_ids, self.models.tokenizer,
                    self.models.generator(params), spec, arrival, random_kv)
        r.proposer = self._proposer(r)
        if needs_history(params):
            r.history = TokenHistory(params, r.prompt, self.model.config.vocab_size, self.model.device, r.eos)
        if params.prompt_logprobs is not None:
            r.prompt_logprobs = [None]
        if params.grammar is not None:
            r.grammar = GrammarState(self.grammar_tokenizer(), params.grammar)
        self.requests[rid] = r
        self.scheduler.add(r)
        return rid

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The grammar library's view of the tokenizer (made on the first structured request)."""
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = GrammarTokenizer(self.models.tokenizer.backend.to_str(),
                                                       self.model.config.vocab_size, self.models.eos_token_ids)
        return self._grammar_tokenizer

    @property
    def uses_suffix(self) -> bool:
        return self.spec is not None and self.spec.lookup == "suffix"

    def _proposer(self, r: Request) -> Proposer | None:
        """The model-free proposer a request drafting with "ngram", "suffix" or "hybrid" needs (or None)."""
        method = self.policy.method_of(r) if self.policy is not None else r.spec.method or "none"
        if method not in ("ngram", "suffix", "hybrid"):
            return None
        tuning = self.spec.tuning if self.spec is not None else DraftTuning()
        source = method if method != "hybrid" else tuning.lookup
        if source == "ngram":
            return NgramProposer(tuning.ngram_min, tuning.ngram_max)
        return SuffixProposer(self.shared_outputs)

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
        capture = self._capture_s()
        choose: Callable = self.policy.choose if self.policy is not None else (lambda rs: [0] * len(rs))
        plan = self.scheduler.schedule(choose)
        self.cache.map_rings(self.scheduler.remap)  # the sliding groups' blocks of the rows' new columns
        self.scheduler.remap = []
        sources = [r.draft.source if g else "" for r, g in zip(plan.decode, plan.gammas)]
        output = self.runner.execute(plan)
        advanced = self._aborted + self.scheduler.update(plan, output, time.monotonic())
        self._aborted = []
        outs = []
        for r in advanced:
            outs.append(r.delta())
            if r.finished:
                self.requests.pop(r.request_id, None)
                if r.proposer is not None and r.finish_reason in ("stop", "length") and self.uses_suffix:
                    self.shared_outputs.add(r.request_id, r.output)
                if r.finish_reason == "error":
                    self.stats.errors += 1
                elif r.finish_reason != "abort":
                    self.stats.finished += 1
        rounds = [(r.request_id, g, k, src) for r, g, k, src in zip(plan.decode, plan.gammas, output.accepted, sources)
                  if k is not None]
        for _, g, k, _ in rounds:
            if g:
                self.stats.spec.record(g, k)
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(min(c.end, len(c.request.prompt)) - c.start for c in plan.chunks
                                        if c.start < len(c.request.prompt))
        new = sum(len(o.new_token_ids) for o in outs)
        self.stats.generation_tokens += new
        report = StepReport([i for i, *_ in rounds], [g for _, g, *_ in rounds], [k for _, _, k, _ in rounds],
                            sum(c.end - c.start for c in plan.chunks), new, time.perf_counter() - t0,
                            output.draft_s, output.verify_s, output.other_s, output.prefill_s,
                            self._capture_s() - capture, [src for *_, src in rounds])
        if self.policy is not None and rounds:
            self.policy.observe(report, self.requests)
        self.last_report = report
        return outs

    def _capture_s(self) -> float:
        return self.graphs.capture_s + sum(f.capture_s for f in self._draft_forwards.values() if f is not self.graphs)

    def forget_outputs(self) -> None:
        """Forget the recent outputs suffix drafts propose from. A benchmark that runs the same prompts again
        must call it before each run, or suffix drafts replay the last run's outputs and it measures memory."""
        self.shared_outputs.clear()

    def close(self) -> None:
        """Abort every request and free the KV pools now (the core is unusable after)."""
        for rid in list(self.requests):
            self.abort_request(rid)
        self.graphs.release()
        for f in self._draft_forwards.values():
            f.release()
        self.cache.k = self.cache.v = torch.empty(0)
        for pool in self._draft_pools.values():
            pool.k = pool.v = torch.empty(0)
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()


def check_guided_room(spec: SpecConfig | None, block_size: int) -> None:
    """A guided draft with a window of its own must leave room in its budget for the sink block and one
    selected block."""
    if (spec is not None and spec.drafter == "guided" and spec.tuning.guided_window is not None
            and (spec.budget - spec.recent_window) // block_size < 2):
        P = block_size
        raise ValueError(f"a guided draft reads the sink block and at least one selected block of {P} tokens "
                         f"beside its recent window (guided_window={spec.recent_window} tokens): --budget "
                         f"{spec.budget} must be ≥ {spec.recent_window + 2 * P}, or use a smaller guided_window")

