"""The Python API: load a model once, then generate for batches of prompts.

    from magicdec import LLM, SamplingParams, SpecConfig
    llm = LLM()                                    # built-in SmolLM2-135M-Instruct
    result = llm.generate(["It is a truth"], SamplingParams(max_new_tokens=32),
                          spec=SpecConfig(method="self", budget=512, gamma=3))
    result.outputs[0].text, result.stats.tokens_per_s, result.stats.acceptance_rate

A request flows: tokenize → validate against the context and the memory plan → sort rows by prompt
length → chunked prefill of the target → first token → (drafter prefill) → decode loop (plain, or
draft → verify → commit rounds) → outputs in the caller's order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.memory import MemoryPlan, kv_cache_bytes
from magicdec.costmodel import CostModel, DraftSpec, load_profile
from magicdec.costmodel.device import device_profile
from magicdec.engine.autogamma import AutoGamma
from magicdec.engine.decode import Decoding, FixedGamma, GammaPolicy, make_verifier
from magicdec.engine.outputs import GenerationResult, RequestOutput, RunStats
from magicdec.engine.prefill import prefill
from magicdec.engine.runner import ModelRunner
from magicdec.engine.sampling import SamplingParams, next_tokens
from magicdec.engine.state import BatchState, Stopper
from magicdec.loading import LoadedModel, load_model
from magicdec.parallel.tp import RankZeroGamma, TensorParallel, broadcast_seed
from magicdec.spec.config import SpecConfig
from magicdec.spec.drafter import Drafter
from magicdec.spec.factory import plan_drafter

Prompt = str | Sequence[int]
DRAFT_PLACEMENTS = ("auto", "sharded", "replicated")


@dataclass(slots=True)
class PrefilledBatch:
    """A batch after prefill and its first token: the target cache and the decoding state."""

    cache: DenseKVCache
    state: BatchState
    prompt_lens: list[int]  # sorted, longest first, as the cache rows are
    params: SamplingParams
    stopper: Stopper
    prefill_s: float
    keep: bool  # decode copies, leaving this batch reusable
    max_gamma: int
    rng_state: torch.Tensor | None = None  # the sampler's state after the first tokens: decoding goes on from it
    work: DenseKVCache | None = None  # the copy decodes run on (one buffer, so CUDA graphs are reused)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The sampling generator, continuing the stream that drew the first tokens (a second stream with
        the same seed would repeat those draws and correlate the first tokens with the next ones)."""
        if self.rng_state is None:
            return None
        g = torch.Generator(device=device)
        g.set_state(self.rng_state)
        return g

    def take(self) -> tuple[DenseKVCache, BatchState]:
        if self.keep:
            if self.work is None:
                self.work = self.cache.clone()
            else:
                self.work.copy_(self.cache)
            return self.work, self.state.clone()
        if self.state is None:
            raise ValueError("this prefilled batch was already decoded; prefill with keep=True to decode it twice")
        cache, state = self.cache, self.state
        self.state = None  # type: ignore[assignment]
        return cache, state


class PromptError(ValueError):
    """A prompt the model cannot take (empty, or too long for its context)."""


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
        `memory_budget`: bytes that weights plus caches may use (default: what the device has free).
        `tp`: this process's rank in a tensor-parallel group (see `magicdec.parallel`); `draft_tp`: a
        draft model "sharded" like the target, "replicated" on every rank, or "auto" (the cost model's choice)."""
        if draft_tp not in DRAFT_PLACEMENTS:
            raise ValueError(f"draft_tp must be one of {DRAFT_PLACEMENTS}, got {draft_tp!r}")
        self.tp, self.draft_tp = tp, draft_tp
        self.loaded = loaded or load_model(model, dtype, device, tp=tp)
        self.model, self.tokenizer, self.config = self.loaded.model, self.loaded.tokenizer, self.loaded.config
        self.device, self.dtype = self.model.device, self.model.dtype
        self.prefill_chunk, self.memory_budget = prefill_chunk, memory_budget
        eos = set(self.config.eos_token_ids)
        if not eos and self.tokenizer.token_id(self.tokenizer.eos_token) is not None:
            eos = {self.tokenizer.token_id(self.tokenizer.eos_token)}
        self.eos_token_ids: set[int] = eos
        self._draft_models: dict[str, LoadedModel] = {}
        self.runner = ModelRunner(self.model)  # decode-shaped forwards (CUDA graphs on CUDA)
        # finished rows: dropped from the caches at once (eager), or kept as padding until the batch can
        # shrink to a smaller CUDA graph (lazy); None: lazy exactly when CUDA graphs are used
        self.lazy_compaction: bool | None = None
        self.draft_runners: dict[str, ModelRunner] = {}

    # ---- prompts ---------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
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

    def _check_context(self, ids: list[list[int]], params: SamplingParams) -> None:
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
        compare: bool = False,
        progress: bool = False,
        gamma_policy: GammaPolicy | None = None,
    ) -> GenerationResult:
        """Generate for a batch. With `spec`, decode speculatively; with `compare`, also run plain
        decoding on the same prefilled batch and report the speedup (prefill excluded)."""
        spec = spec or SpecConfig()
        compare = compare and spec.enabled
        batch = self.prefill(prompts, params, max_gamma=spec.gamma_bound if spec.enabled else 0, keep=compare)
        result = self.decode(batch, spec, gamma_policy=gamma_policy, progress=progress)
        if compare:
            plain = self.decode(batch, progress=progress)
            result.baseline = plain.stats
            if batch.params.greedy:
                result.stats.extra["matches_plain"] = [o.token_ids for o in plain.outputs] == [
                    o.token_ids for o in result.outputs
                ]
        return result

    def prefill(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, max_gamma: int = 0, keep: bool = False
    ) -> PrefilledBatch:
        """Tokenize, check and prefill a batch, and pick each sequence's first token. With `keep`,
        `decode` works on copies, so the same prefilled batch can be decoded several ways."""
        params = params or SamplingParams()
        ids = self.encode(prompts)
        self._check_context(ids, params)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        sorted_ids = [ids[i] for i in order]
        lens = [len(p) for p in sorted_ids]
        capacity = lens[0] + params.max_new_tokens + max_gamma + 1
        target = kv_cache_bytes(self.config.n_layers, len(ids), self.model.kv_heads, self.config.head_dim,
                                capacity + 1, self.dtype)
        plan = MemoryPlan(to_allocate={"target KV cache": target})
        if keep:
            plan.to_allocate["working copy of the KV cache"] = target
        plan.check(self.device, self.memory_budget)

        self.release_graphs()  # graphs of earlier batches point at their buffers
        cache = DenseKVCache.for_model(self.model, len(ids), capacity)
        tokens = torch.zeros((len(ids), capacity + 2), dtype=torch.long, device=self.device)
        for r, p in enumerate(sorted_ids):
            tokens[r, : len(p)] = torch.tensor(p)
        generator = self._generator(params)
        t0 = time.perf_counter()
        last = prefill(self.model, cache, tokens, lens, self.prefill_chunk)
        first = next_tokens(last, params, generator)
        lengths = torch.tensor(lens, device=self.device)
        tokens.scatter_(1, lengths[:, None], first[:, None])
        prefill_s = time.perf_counter() - t0

        stopper = Stopper(self.tokenizer, params, self.eos_token_ids)
        outputs = [RequestOutput(order[r], sorted_ids[r]) for r in range(len(ids))]
        for out, tok in zip(outputs, first.tolist()):
            stopper.extend(out, [tok])
        rng = generator.get_state() if generator is not None else None
        return PrefilledBatch(cache, BatchState(outputs, tokens, lengths), lens, params, stopper, prefill_s, keep,
                              max_gamma, rng)

    def decode(
        self,
        batch: PrefilledBatch,
        spec: SpecConfig | None = None,
        *,
        gamma_policy: GammaPolicy | None = None,
        progress: bool = False,
    ) -> GenerationResult:
        """Decode a prefilled batch, plainly or speculatively (γ ≤ the `max_gamma` it was prefilled for)."""
        spec = spec or SpecConfig()
        if spec.enabled and spec.gamma_bound > batch.max_gamma:
            raise ValueError(f"this batch was prefilled for γ ≤ {batch.max_gamma}, not {spec.gamma_bound}: "
                             f"pass max_gamma={spec.gamma_bound} to prefill")
        cache, state = batch.take()
        params, stopper = batch.params, batch.stopper
        stats = RunStats(batch=state.rows, prompt_tokens=sum(batch.prompt_lens), method=spec.method,
                         prefill_s=batch.prefill_s)
        outputs = list(state.outputs)
        generator = batch.generator(self.device)
        with tqdm(total=state.rows * params.max_new_tokens, desc=spec.method if spec.enabled else "plain",
                  unit="tok", delay=2, disable=not progress, leave=False) as bar:
            bar.update(sum(len(o.token_ids) for o in outputs))
            decoding = Decoding(self.runner, cache, state, params, generator, stopper, stats, bar.update,
                                eager=not self._lazy())
            if not spec.enabled:
                self.runner.prepare(cache, state.rows, 1)
                captured = self._capture_s()
                decoding.run_plain()
                self._exclude_captures(stats, captured)
            else:
                draft = plan_drafter(self, spec, state.rows, cache.capacity)
                MemoryPlan(to_allocate={"draft KV cache": draft.cache_bytes}).check(self.device, None)
                t1 = time.perf_counter()
                drafter = draft.build()
                drafter.prefill(self.model, cache, state.tokens, batch.prompt_lens, self.prefill_chunk)
                if self.device.type == "cuda":  # its time, not the first decoding step's
                    torch.cuda.synchronize(self.device)
                stats.draft_prefill_s = time.perf_counter() - t1
                policy = gamma_policy or self.gamma_policy(spec, drafter, params.max_new_tokens)
                verifier = make_verifier(params, generator, spec.synthetic_acceptance)
                if spec.synthetic_acceptance is not None:
                    stats.extra["synthetic_acceptance"] = spec.synthetic_acceptance
                if spec.gamma != "auto":
                    self.runner.prepare(cache, state.rows, int(spec.gamma) + 1)
                    drafter.forward.prepare(drafter.cache, state.rows, 1, with_index=True)
                captured = self._capture_s()
                decoding.run_speculative(drafter, policy, verifier)
                self._exclude_captures(stats, captured)
                if isinstance(policy, (AutoGamma, RankZeroGamma)):
                    stats.extra["alpha_estimate"] = policy.alpha.value
        stats.generated_tokens = sum(len(o.token_ids) for o in outputs)
        return GenerationResult(self._finish(outputs, stopper), stats)

    @property
    def tp_world(self) -> int:
        return self.tp.world if self.tp is not None else 1

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        """The sampling generator; under tensor parallelism every rank draws the same numbers."""
        if params.greedy:
            return None
        seed = broadcast_seed(self.tp, params.seed, self.device)
        return replace(params, seed=seed).generator(self.device)

    def _lazy(self) -> bool:
        return self.runner.cuda_graphs if self.lazy_compaction is None else self.lazy_compaction

    def release_graphs(self) -> None:
        """Drop the CUDA graphs of the target and draft runners (they point at buffers of earlier batches)."""
        for runner in (self.runner, *self.draft_runners.values()):
            runner.release()

    def _capture_s(self) -> float:
        return self.runner.capture_s + sum(r.capture_s for r in self.draft_runners.values())

    def _exclude_captures(self, stats: RunStats, before: float) -> None:
        """CUDA-graph captures of shapes first met mid-run (a batch shrinking as sequences finish) are
        a one-time cost: report them apart from the steady-state decode time."""
        spent = self._capture_s() - before
        if spent > 0:
            stats.decode_s -= spent
            stats.extra["graph_capture_s"] = spent

    def gamma_policy(self, spec: SpecConfig, drafter: Drafter, max_new_tokens: int | None = None) -> GammaPolicy:
        """A fixed γ, or for gamma="auto" the cost-model policy with this device's profile (which drafts no
        further than `max_new_tokens` needs)."""
        if spec.gamma != "auto":
            return FixedGamma(int(spec.gamma))
        profile = load_profile(spec.profile) if spec.profile else device_profile(self.device, self.config, self.dtype)
        if self.tp_world > 1 and profile.interconnect_bandwidth <= 0:
            # ranks on one host without a profiled link (gloo on a CPU): communication goes through memory;
            # the step times each round measures correct the estimate
            profile = replace(profile, interconnect_bandwidth=profile.mem_bandwidth)
        budget = None if spec.drafter == "full" else spec.budget
        draft = (DraftSpec("self", budget) if spec.method == "self"
                 else DraftSpec("model", budget, drafter.model.config))
        cost = CostModel(self.config, profile, draft, dtype_bytes=self.dtype.itemsize, tp=self.tp_world)
        policy = AutoGamma(cost, spec.max_gamma, max_new_tokens=max_new_tokens)
        return policy if self.tp is None or self.tp.world == 1 else RankZeroGamma(policy, self.tp, self.device)

    def _finish(self, outputs: list[RequestOutput], stopper: Stopper) -> list[RequestOutput]:
        for out in outputs:
            stopper.finalize(out)
        return sorted(outputs, key=lambda o: o.index)
