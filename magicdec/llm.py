"""The Python API: load a model once, then generate for batches of prompts.

    from magicdec import LLM, SamplingParams, SpecConfig
    llm = LLM()                                    # built-in SmolLM2-135M-Instruct
    result = llm.generate(["It is a truth"], SamplingParams(max_new_tokens=32),
                          spec=SpecConfig(method="self", budget=512, gamma=3))
    result.outputs[0].text, result.stats.tokens_per_s, result.stats.acceptance_rate

`generate` runs the serving engine's core (`engine_core`: continuous batching over a paged KV cache,
the path `magicdec serve` and `magicdec.Engine` run): every prompt is queued at once, the scheduler admits
what the pool holds, chunks the prompts, and every step runs one forward for the decoding requests (a plain
step, or a draft of γ_i tokens and one verification with ragged γ, per request) → outputs in the caller's
order. The γ policy is a fixed γ, or for `gamma="auto"` the cost model's, which is why this module sits
above both the engine and the planning layer.

The static batch (`prefill` → `decode`: one dense cache per row, CUDA graphs, forkable for benchmarks) is
the lower-level API that the benchmarks time and fork; `generate` uses it only for what the engine does not
run (a batch-wide `gamma_policy`, a self-draft with KV of its own).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from magicdec.cache.memory import MemoryPlan, OutOfMemoryPlan, available_bytes, fmt_bytes
from magicdec.cache.paged import PagedKVCache
from magicdec.config import ModelConfig
from magicdec.costmodel import CostModel, load_profile
from magicdec.costmodel.device import device_profile
from magicdec.costmodel.placement import check_placement, shard_draft
from magicdec.costmodel.policy import AutoGamma, FixedGamma, GammaPolicy, RequestGamma
from magicdec.costmodel.steps import draft_spec
from magicdec.engine.batch import Batch, prefill_transient_bytes
from magicdec.engine.core import EngineCore, PagedDraft
from magicdec.engine.outputs import GenerationResult, RequestOutput, RunStats
from magicdec.engine.request import StepOutput
from magicdec.engine.scheduler import SchedulerConfig, scheduling_for
from magicdec.engine.state import Stopper
from magicdec.engine.step import Decoding, RoundReport
from magicdec.kernels import cpu as cpu_kernels
from magicdec.loading import LoadedModel, load_model
from magicdec.loading.errors import LoadError
from magicdec.model.llama import Transformer
from magicdec.model.quant import quantize_weights, quantized_bytes
from magicdec.parallel.tp import RankZeroGamma, TensorParallel, agree_min, broadcast_seed
from magicdec.runtime.runner import ModelRunner
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import Auto, SpecConfig, paged_problem
from magicdec.spec.drafter import Drafter
from magicdec.spec.factory import plan_drafter
from magicdec.spec.verify import Verifier

Prompt = str | Sequence[int]
QUANT_BITS = {"int8": 8, "int4": 4}  # draft_weights → bits
CPU_KV_SHARE = 0.4  # of the free memory, what a paged KV pool takes by default on the CPU (the rest: prefill, the OS)
CUDA_KV_SHARE = 0.85  # … and on a GPU (after the weights)
OnRound = Callable[[RoundReport], None]


class PromptError(ValueError):
    """A prompt the model cannot take (empty, or too long for its context)."""


def check_draft_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """A draft model must speak the target's tokens: its tokenizer maps every token to the target's id,
    and its vocabulary is the target's or a prefix of it (a target padded to a rounder size, e.g.
    Qwen2.5-7B's 152064 against Qwen2.5-0.5B's 151936). The draft proposes no id beyond its own."""
    name, dv, tv = draft.path, draft.config.vocab_size, target.config.vocab_size
    if dv > tv:
        raise LoadError(f"draft model {name} has a vocabulary of {dv} tokens, more than the target's {tv}; "
                        "a draft model must share the target's tokenizer")
    mine, theirs = draft.tokenizer.backend.get_vocab(), target.tokenizer.backend.get_vocab()
    differ = sorted((i, t) for t, i in mine.items() if i < dv and theirs.get(t) != i)
    if differ:
        i, t = differ[0]
        raise LoadError(f"draft model {name} does not share the target's tokenizer: its token {t!r} has id {i}, "
                        f"the target's {theirs.get(t)} ({len(differ)} tokens differ); choose a draft model "
                        "trained with the target's tokenizer")


def token_ids(prompt: object, i: int) -> list[int]:
    """Prompt i given as token ids: a sequence of int (not bytes, floats, bools or nested lists)."""
    if isinstance(prompt, (bytes, bytearray)):
        raise PromptError(f"prompt {i} is {type(prompt).__name__}: decode it to a str (e.g. "
                          "prompt.decode('utf-8')) or pass its token ids as a list of int")
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 1 and not prompt.is_floating_point() \
            and prompt.dtype is not torch.bool:
        return prompt.tolist()
    if type(prompt).__module__ == "numpy" and getattr(prompt, "ndim", 0) == 1 and prompt.dtype.kind in "iu":
        return prompt.tolist()  # a numpy array of integer ids
    if not isinstance(prompt, Sequence):
        raise PromptError(f"prompt {i} must be a str or a list of int token ids, got {type(prompt).__name__}: "
                          f"{prompt!r:.80}")
    for j, t in enumerate(prompt):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool):
            raise PromptError(f"prompt {i} has a {type(t).__name__} at position {j} ({t!r:.40}): token ids must be "
                              "int; pass a str to tokenize, or a list of int token ids")
    return [int(t) for t in prompt]


def check_arguments(params: object, spec: object) -> None:
    """Refuse, with the argument named, a `params` or `spec` of the wrong type (before any work)."""
    if params is not None and not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams (or None), got {type(params).__name__}: {params!r:.80}")
    if spec is not None and not isinstance(spec, SpecConfig):
        raise TypeError(f"spec must be a SpecConfig (or None), got {type(spec).__name__}: {spec!r:.80}")


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        prefill_chunk: int = 512,
        memory_budget: int | None = None,
        loaded: LoadedModel | None = None,
        tp: TensorParallel | None = None,
        draft_tp: str = "auto",
    ) -> None:
        """`model`: a Hugging Face checkpoint directory, a .gguf file, or None for the built-in model.
        `memory_budget`: bytes that weights, caches and the transients of prefill may use (default: what the
        device has free).
        `tp`: this process's rank in a tensor-parallel group (see `magicdec.parallel`); `draft_tp`: a
        draft model "sharded" like the target, "replicated" on every rank, or "auto" (the cost model's choice)."""
        check_placement(draft_tp)  # before loading anything
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be ≥ 1 token, got {prefill_chunk}")
        self.tp, self.draft_tp = tp, draft_tp
        self.loaded = loaded or load_model(model, dtype, device, tp=tp)
        self.model, self.tokenizer, self.config = self.loaded.model, self.loaded.tokenizer, self.loaded.config
        self.device, self.dtype = self.model.device, self.model.dtype
        self.prefill_chunk, self.memory_budget = prefill_chunk, memory_budget
        eos = set(self.config.eos_token_ids)
        if not eos and self.tokenizer.token_id(self.tokenizer.eos_token) is not None:
            eos = {self.tokenizer.token_id(self.tokenizer.eos_token)}
        self.eos_token_ids: set[int] = eos
        cpu_kernels.ensure_built(self.device)  # a first run compiles them now, not inside the prefill's time
        self.runner = ModelRunner(self.model)  # decode-shaped forwards (CUDA graphs on CUDA)
        self._drafts: dict[str, tuple[LoadedModel, ModelRunner]] = {}
        self._quantized: dict[str, tuple[Transformer, ModelRunner]] = {}  # self-drafts with quantized weights
        # finished rows: dropped from the caches at once (eager), or kept as padding until the batch can
        # shrink to a smaller CUDA graph (lazy); None: lazy exactly when CUDA graphs are used
        self.lazy_compaction: bool | None = None

    # ---- prompts ---------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt: a str is tokenized, a sequence of int token ids taken as it is; anything
        else (bytes, floats, bools, nested lists) is refused with the argument and the fix."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise PromptError(f"prompts must be a list of prompts (each a str or a list of int token ids), got "
                              f"{type(prompts).__name__}: {prompts!r:.80}")
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else token_ids(p, i) for i, p in enumerate(prompts)]
        if not ids:
            raise PromptError("no prompts given")
        for i, p in enumerate(ids):
            if not p:
                raise PromptError(f"prompt {i} is empty after tokenization")
            bad = [t for t in p if not 0 <= t < self.config.vocab_size]
            if bad:
                raise PromptError(
                    f"prompt {i} has token ids outside the vocabulary of {self.config.vocab_size}: {bad[:5]}"
                )
        return ids

    def check_context(self, ids: list[list[int]], params: SamplingParams) -> None:
        limit = self.config.max_position_embeddings
        window = self.config.sliding_window
        for i, p in enumerate(ids):
            total = len(p) + params.max_new_tokens
            if total > limit:
                raise PromptError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} that is {total} "
                    f"positions, beyond the model's context of {limit}. Shorten the prompt or lower max_new_tokens."
                )
            if window is not None and total > window:
                raise PromptError(
                    f"prompt {i} needs {total} positions but this model attends over a sliding window of {window}, "
                    "which magicdec does not implement; shorten the prompt or lower max_new_tokens"
                )

    # ---- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None = None,
        spec: SpecConfig | None = None,
        *,
        progress: bool = False,
        gamma_policy: GammaPolicy | None = None,
    ) -> GenerationResult:
        """Generate for every prompt, with `spec`'s speculation: continuous batching over the paged KV cache
        (the serving engine's core, the code path `magicdec serve` runs), all prompts queued at once. A seeded
        `params` gives prompt i the seed `seed + i`. With `gamma_policy` (one γ for the whole batch, for
        experiments) or a self-draft with KV of its own, the static batch runs instead (`prefill` + `decode`).
        A request that fails on its own (e.g. NaN logits) raises its error here."""
        check_arguments(params, spec)
        spec, params = spec or SpecConfig(), params or SamplingParams()
        if gamma_policy is not None or paged_problem(spec) is not None:
            batch = self.prefill(prompts, params, max_gamma=spec.gamma_bound if spec.enabled else 0,
                                 progress=progress)
            return self.decode(batch, spec, gamma_policy=gamma_policy, progress=progress)
        ids = self.encode(prompts)
        self.check_context(ids, params)
        return self.run_core(self.core_for(ids, params, spec), ids, params, spec, progress=progress)

    def core_for(self, ids: list[list[int]], params: SamplingParams, spec: SpecConfig, runs: int = 1) -> EngineCore:
        """An engine core for these prompts at once, its pool sized for `runs` runs of all of them (a second run
        finds the first's prompts in the prefix cache)."""
        bound = spec.gamma_bound if spec.enabled else 0
        lengths = [len(p) + params.max_new_tokens for p in ids]
        return self.engine_core(spec, max_num_seqs=len(ids), max_num_batched_tokens=len(ids) * (bound + 1) +
                                self.prefill_chunk, max_model_len=max(lengths), exact_pool=lengths * runs)[0]

    def run_core(self, core: EngineCore, ids: list[list[int]], params: SamplingParams, spec: SpecConfig,
                 progress: bool = False) -> GenerationResult:
        """Queue every prompt in `core` (whose speculation is `spec`'s), step until all have finished; outputs in
        the prompts' order. A seeded `params` gives prompt i the seed `seed + i`. Prefill time is the steps'
        prefill chunks, decode time the rest; `steady_tokens_per_s` counts the steps where every request decoded
        and none prefilled."""
        rows = len(ids)
        order = [core.add_request(p, replace(params, seed=None if params.seed is None else params.seed + i))
                 for i, p in enumerate(ids)]
        stats = RunStats(batch=rows, prompt_tokens=sum(map(len, ids)), method=spec.method)
        final: dict[str, StepOutput] = {}
        steady_s, steady_tokens = 0.0, 0
        with tqdm(total=rows * params.max_new_tokens, desc=spec.label, unit="tok", delay=2, disable=not progress,
                  leave=False) as bar:
            while core.has_unfinished_requests():
                for out in core.step():
                    bar.update(len(out.new_token_ids))
                    if out.finished:
                        final[out.request_id] = out
                if core.step_errors:  # a request failed: so does the generation, with its error
                    for rid in list(core.requests):
                        core.abort_request(rid)
                    raise next(iter(core.step_errors.values()))
                report = core.last_report
                assert report is not None
                stats.prefill_s += report.prefill_s
                stats.decode_s += report.seconds - report.prefill_s
                if report.request_ids and max(report.gammas):
                    stats.draft_s += report.draft_s
                    stats.verify_s += report.verify_s
                if spec.enabled and report.request_ids:
                    stats.gamma_history.append(max(report.gammas))
                if len(report.request_ids) == rows and not report.prefill_tokens:
                    steady_s += report.seconds
                    steady_tokens += report.new_tokens
        outputs = []
        for i, rid in enumerate(order):
            o = final[rid]
            outputs.append(RequestOutput(i, o.prompt_token_ids, o.token_ids, o.text, o.finish_reason, o.spec))
            stats.acceptance.merge(o.spec)
        stats.generated_tokens = sum(len(o.token_ids) for o in outputs)
        stats.extra.update(engine="continuous", steady_tokens_per_s=steady_tokens / steady_s if steady_s else 0.0,
                           prefix_cached_tokens=sum(final[r].metrics.cached_tokens for r in order))
        core.pool.check_empty()
        return GenerationResult(outputs, stats)

    def stopper(self, params: SamplingParams) -> Stopper:
        return Stopper(self.tokenizer, params, self.eos_token_ids)

    def prefill(self, prompts: Sequence[Prompt], params: SamplingParams | None = None, max_gamma: int = 0,
                progress: bool = False) -> Batch:
        """Tokenize and check prompts, build their batch (room for rounds of up to `max_gamma` drafts),
        prefill it and pick each sequence's first token."""
        params = params or SamplingParams()
        ids = self.encode(prompts)
        self.check_context(ids, params)
        self.release_graphs()  # graphs of earlier batches point at their buffers
        batch = Batch.allocate(self.model, ids, params, self.stopper(params), max_gamma, self.memory_budget,
                               self.memory_plan(), self.prefill_chunk)
        with tqdm(total=sum(len(p) for p in ids), desc="prefill", unit="tok", delay=2, disable=not progress,
                  leave=False) as bar:
            return batch.prefill(self.model, self.prefill_chunk, self.generator(params), progress=bar.update)

    def decode(
        self,
        batch: Batch,
        spec: SpecConfig | None = None,
        *,
        gamma_policy: GammaPolicy | None = None,
        verifier: Verifier | None = None,
        on_round: OnRound | None = None,
        progress: bool = False,
        resident: dict[str, int] | None = None,
    ) -> GenerationResult:
        """Decode a prefilled batch (in place), plainly or speculatively: ask the γ policy, step, report.
        `verifier` replaces the exact acceptance rule (synthetic acceptance in systems benchmarks);
        `on_round` sees every round's report; `resident`: named bytes held elsewhere (e.g. the batch this
        one was forked from), which the draft cache's memory plan counts."""
        spec = spec or SpecConfig()
        state = batch.state
        if state is None:
            raise ValueError("decode a batch after its prefill")
        if spec.enabled and spec.gamma_bound > batch.max_gamma:
            raise ValueError(f"this batch was prefilled for γ ≤ {batch.max_gamma}, not {spec.gamma_bound}: "
                             f"pass max_gamma={spec.gamma_bound} to prefill")
        stats = RunStats(batch=state.rows, prompt_tokens=sum(batch.prompt_lens), method=spec.method,
                         prefill_s=batch.prefill_s)
        outputs = list(state.outputs)  # in row order before any compaction
        drafter: Drafter | None = None
        policy: GammaPolicy = FixedGamma(0)
        if spec.enabled and state.live():  # (no drafter for sequences that all ended at their first token)
            t0 = time.perf_counter()
            drafter = self._drafter(spec, batch, resident)
            stats.draft_prefill_s = time.perf_counter() - t0
            policy = gamma_policy or self.gamma_policy(spec, drafter.model.config)
        decoding = Decoding(self.runner, batch, drafter, eager=not self._lazy(), verifier=verifier,
                            capture_s=self._capture_s)
        params = batch.params
        with tqdm(total=state.rows * params.max_new_tokens, desc=spec.label, unit="tok", delay=2,
                  disable=not progress, leave=False) as bar:
            bar.update(sum(len(o.token_ids) for o in outputs))
            start, captured = time.perf_counter(), 0.0
            while not decoding.done:
                report = decoding.step(policy.choose(decoding.view()))
                policy.observe(report)
                captured += report.capture_s
                if spec.enabled:
                    stats.gamma_history.append(report.gamma)
                    if report.gamma:
                        stats.draft_s += report.draft_s
                        stats.verify_s += report.verify_s
                bar.update(report.new_tokens)
                if on_round is not None:
                    on_round(report)
            # CUDA-graph captures of shapes first met mid-run are a one-time cost, reported apart
            stats.decode_s = time.perf_counter() - start - captured
            if captured:
                stats.extra["graph_capture_s"] = captured
        stats.extra.update(policy.stats())
        stats.generated_tokens = sum(len(o.token_ids) for o in outputs)
        for out in outputs:
            stats.acceptance.merge(out.spec)
            batch.stopper.finalize(out)
        return GenerationResult(sorted(outputs, key=lambda o: o.index), stats)

    # ---- continuous batching: the serving engine's core ------------------------------------------------
    def engine_core(self, spec: SpecConfig | None, *, max_num_seqs: int = 8, max_num_batched_tokens: int = 1024,
                    prefill_chunk: int | None = None, block_size: int = 64, num_blocks: int | None = None,
                    kv_cache_memory: int | None = None, enable_prefix_caching: bool = True,
                    max_model_len: int | None = None, exact_pool: list[int] | None = None
                    ) -> tuple[EngineCore, RequestGamma | None]:
        """The core of a continuous-batching engine over a paged KV cache, with `spec`'s speculation, and its
        γ policy. The pool holds `num_blocks` blocks of `block_size` tokens, or what `kv_cache_memory` bytes
        hold, or a share of the free memory (never more than `max_num_seqs` requests of `max_model_len`
        tokens need, or than requests of the `exact_pool` lengths need); under tensor parallelism a pool sized
        here is the smallest any rank can hold (every rank must schedule the same forwards). A model with a
        sliding window refuses requests longer than it (sliding windows are not implemented)."""
        spec = spec if spec is not None and spec.enabled else None
        problem = paged_problem(spec) if spec is not None else None
        if problem:
            raise ValueError(problem)
        if block_size < 1 or block_size % 64:
            raise ValueError(f"block_size must be a positive multiple of 64 tokens (the CPU kernel reads keys in "
                             f"64-slot blocks), got {block_size}")
        model = self.model
        max_len = min(max_model_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        config = scheduling_for(SchedulerConfig(max_num_seqs, max_num_batched_tokens,
                                                prefill_chunk or self.prefill_chunk, 0, enable_prefix_caching),
                                spec, block_size)
        draft_model = self.drafting(spec)[0] if spec is not None and spec.method == "draft" else None
        per_block = PagedKVCache.bytes_per_block(model, block_size)
        if draft_model is not None:
            per_block += PagedKVCache.bytes_per_block(draft_model, block_size)
        if num_blocks is None:
            lookahead = config.max_gamma + 1
            lengths = exact_pool if exact_pool is not None else [max_len] * max_num_seqs
            want = sum(-(-(n + lookahead) // block_size) + config.kept_blocks for n in lengths)
            if kv_cache_memory is None:
                if self.memory_budget is not None:  # what the weights and one prefill chunk's transients leave
                    chunk = min(config.prefill_chunk, max_len)
                    transient = prefill_transient_bytes(model, 1, chunk, max_len)
                    kv_cache_memory = max(self.memory_budget - self.memory_plan().total - transient, 0)
                else:
                    share = CUDA_KV_SHARE if self.device.type == "cuda" else CPU_KV_SHARE
                    kv_cache_memory = int(available_bytes(self.device) * share)
            num_blocks = min(kv_cache_memory // per_block, want)
            if self.tp is not None and self.tp.world > 1:  # every rank's pool the same: the smallest
                num_blocks = agree_min(self.tp, num_blocks, self.device)
            one = -(-(max(lengths) + lookahead) // block_size) + config.kept_blocks  # the longest request alone
            if num_blocks < one:
                plan = self.memory_plan()
                plan.to_allocate["target KV cache" + (" and draft KV cache" if draft_model else "")] = one * per_block
                plan.fix = "use shorter prompts or fewer new tokens"
                plan.check(self.device, self.memory_budget)
                raise OutOfMemoryPlan(f"the KV cache gets {num_blocks} blocks of {block_size} tokens "
                                      f"({fmt_bytes(per_block)} each), fewer than the {one} the longest request "
                                      f"needs: {plan.fix}, or give the KV cache more memory (kv_cache_memory)")
        if num_blocks < 1:
            raise OutOfMemoryPlan(f"the KV cache would get {num_blocks} blocks of {block_size} tokens "
                                  f"({fmt_bytes(per_block)} each): give it more memory (kv_cache_memory)")
        cache = PagedKVCache.for_model(model, num_blocks, block_size)
        core = EngineCore(model, self.tokenizer, self.eos_token_ids, cache, config, generator=self.generator,
                          max_model_len=max_len, sliding_window=self.config.sliding_window)
        return core, self.speculate(core, spec)

    def speculate(self, core: EngineCore, spec: SpecConfig | None) -> RequestGamma | None:
        """Make `spec` the speculation of `core` (between requests): its draft over the target's pages (or a
        draft model's pool indexed by the same block tables), its scheduler configuration; returns its γ policy
        (also set as the core's `choose` and `observe`). A new draft-model pool empties the prefix cache: its
        cached blocks hold the target's KV but not the draft's."""
        spec = spec if spec is not None and spec.enabled else None
        problem = paged_problem(spec) if spec is not None else None
        if problem:
            raise ValueError(problem)
        cache, P = core.cache, core.cache.block_size
        if (spec is not None and spec.drafter == "guided" and spec.tuning.guided_window is not None
                and (spec.budget - spec.recent_window) // P < 2):  # a window of its own: room for a selected block
            raise ValueError(f"a guided draft reads the sink block and at least one selected block of {P} tokens "
                             f"beside its recent window (guided_window={spec.recent_window} tokens): --budget "
                             f"{spec.budget} must be ≥ {spec.recent_window + 2 * P}, or use a smaller guided_window")
        config = scheduling_for(core.config, spec, P)
        draft, policy = None, None
        if spec is not None:
            drafter = self.drafting(spec)[0]  # the target, quantized, or a draft model
            window = spec.recent_window if spec.drafter in ("streaming", "guided", "snapkv") else 0
            sinks = spec.sinks if spec.drafter == "streaming" else 0
            if spec.method != "draft":  # self-speculation over the target's pages (its weights, or quantized)
                select = (spec.budget - spec.recent_window) // P if spec.drafter == "guided" else 0
                kept = spec.n_kept if spec.drafter == "snapkv" else 0
                draft = PagedDraft(drafter, None, sinks, window, select=select, kept=kept,
                                   observe=spec.tuning.observe, pool_kernel=spec.tuning.pool_kernel,
                                   score_layers=spec.tuning.guided_scores)
            else:
                target_vocab = self.config.vocab_size
                vocab = target_vocab if drafter.config.vocab_size < target_vocab else None
                pool = core.draft.pool if core.draft is not None and core.draft.model is drafter else None
                if pool is None:  # a new draft pool: no cached prefix has the draft's KV in it
                    pool = PagedKVCache.for_model(drafter, cache.num_blocks, P)
                    core.pool.clear_prefix_cache()
                draft = PagedDraft(drafter, pool, sinks, window, vocab)
            policy = RequestGamma(self.gamma_policy(spec, drafter.config))
        core.draft, core.config, core.scheduler.config = draft, config, config
        core.choose = policy.choose if policy else (lambda rs: [0] * len(rs))
        core.observe = policy.observe if policy else None
        core.block_scores.clear()
        return policy

    # ---- drafting ---------------------------------------------------------------------------------
    def drafting(self, spec: SpecConfig) -> tuple[Transformer, ModelRunner]:
        """The model that drafts for `spec` (the target itself for self-speculation) and its runner."""
        if spec.method == "self":
            if spec.draft_weights == "full":
                return self.model, self.runner
            return self.quantized(spec.draft_weights)
        assert spec.draft_model is not None
        loaded, runner = self.draft_model(spec.draft_model)
        return loaded.model, runner

    def _drafter(self, spec: SpecConfig, batch: Batch, resident: dict[str, int] | None = None) -> Drafter:
        """Plan, check, build and prefill the drafter for `batch` (`resident`: other buffers still held)."""
        assert batch.state is not None
        model, forward = self.drafting(spec)
        rows, capacity = batch.state.rows, batch.cache.capacity
        setup = plan_drafter(spec, model, forward, rows, capacity, self.config.vocab_size)
        plan = self.memory_plan({"target KV cache": batch.cache.nbytes, **(resident or {})})
        plan.to_allocate["draft KV cache"] = setup.cache_bytes
        if spec.tuning.kv_source == "own":  # the draft runs its own chunked prefill
            plan.to_allocate["draft prefill masks and expanded KV (transient)"] = prefill_transient_bytes(
                model, rows, min(self.prefill_chunk, batch.prompt_lens[0]), capacity)
        if spec.drafter == "snapkv":  # votes per layer and KV head, and one layer's scores of the observed queries
            slots, heads = batch.cache.capacity + 1, self.model.kv_heads
            plan.to_allocate["SnapKV votes (transient)"] = 4 * slots * rows * (
                self.config.n_layers * heads + heads * self.config.group_size * spec.tuning.observe)
        plan.fix = (f"lower the draft's KV budget (--budget {spec.budget})" if spec.drafter != "full"
                    else "use a smaller batch, shorter prompts or fewer new tokens")
        plan.check(self.device, self.memory_budget)
        drafter = setup.build()
        drafter.prefill(self.model, batch.cache, batch.state.tokens, batch.prompt_lens, self.prefill_chunk)
        if self.device.type == "cuda":  # its time, not the first decoding step's
            torch.cuda.synchronize(self.device)
        return drafter

    def draft_model(self, path: str) -> tuple[LoadedModel, ModelRunner]:
        """A draft model (loaded once), placed under tensor parallelism as `draft_tp` says, and its runner."""
        if path not in self._drafts:
            shard = self.tp is not None and shard_draft(self.draft_tp, path, self.config, self.tp.world,
                                                        self.device, self.dtype)
            draft = load_model(path, self.dtype, self.device, tp=self.tp if shard else None)
            check_draft_vocabulary(draft, self.loaded)
            self._drafts[path] = (draft, ModelRunner(draft.model))
        return self._drafts[path]

    def quantized(self, weights: str) -> tuple[Transformer, ModelRunner]:
        """The target with its linear layers' weights quantized ("int8" or "int4"; made once, kept beside
        the full weights, sharing the embedding and norms) and its runner: the self-draft of `draft_weights`."""
        if weights not in self._quantized:
            bits = QUANT_BITS[weights]
            plan = self.memory_plan()
            plan.to_allocate[f"{weights} draft weights"] = quantized_bytes(self.model, bits)
            plan.check(self.device, self.memory_budget)
            model = quantize_weights(self.model, bits)
            self._quantized[weights] = (model, ModelRunner(model))
        return self._quantized[weights]

    def add_draft_model(self, name: str, draft: LoadedModel) -> None:
        """Make an already-loaded model (e.g. random weights for a systems benchmark) the draft model that
        `SpecConfig(method="draft", draft_model=name)` names."""
        check_draft_vocabulary(draft, self.loaded)
        self._drafts[name] = (draft, ModelRunner(draft.model))

    def gamma_policy(self, spec: SpecConfig, draft: ModelConfig) -> GammaPolicy:
        """A fixed γ, or for `Auto` the cost-model policy with this device's profile (under tensor
        parallelism, rank 0's choice for every rank)."""
        if not isinstance(spec.gamma, Auto):
            return FixedGamma(spec.gamma)
        auto = spec.gamma
        profile = load_profile(auto.profile) if auto.profile else device_profile(self.device, self.config, self.dtype)
        if self.tp_world > 1 and profile.interconnect_bandwidth <= 0:
            # ranks on one host without a profiled link (gloo on a CPU): communication goes through memory;
            # the step times each round measures correct the estimate
            profile = replace(profile, interconnect_bandwidth=profile.mem_bandwidth)
        cost = CostModel(self.config, profile, draft_spec(spec, draft), dtype_bytes=self.dtype.itemsize,
                         tp=self.tp_world)
        policy = AutoGamma(cost, auto.max_gamma)
        return policy if self.tp is None or self.tp.world == 1 else RankZeroGamma(policy, self.tp, self.device)

    # ---- runtime ----------------------------------------------------------------------------------
    def memory_plan(self, resident: dict[str, int] | None = None) -> MemoryPlan:
        """A memory plan holding what is resident already: the weights (target and drafts), and `resident`."""
        weights = sum(t.numel() * t.element_size() for m in (self.model, *(d.model for d, _ in self._drafts.values()))
                      for t in (*m.parameters(), *m.buffers()))
        weights += sum(quantized_bytes(self.model, QUANT_BITS[w]) for w in self._quantized)
        return MemoryPlan(resident={"weights": weights, **(resident or {})})

    @property
    def tp_world(self) -> int:
        return self.tp.world if self.tp is not None else 1

    def generator(self, params: SamplingParams) -> torch.Generator | None:
        """The sampling generator; under tensor parallelism every rank draws the same numbers."""
        if params.greedy:
            return None
        seed = broadcast_seed(self.tp, params.seed, self.device)
        return replace(params, seed=seed).generator(self.device)

    def _lazy(self) -> bool:
        return self.runner.cuda_graphs if self.lazy_compaction is None else self.lazy_compaction

    def release_graphs(self) -> None:
        """Drop the CUDA graphs of the target and draft runners (they point at buffers of earlier batches)."""
        for runner in (self.runner, *(r for _, r in self._drafts.values())):
            runner.release()

    def _capture_s(self) -> float:
        return self.runner.capture_s + sum(r.capture_s for _, r in self._drafts.values())

