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
from pathlib import Path

import torch
from tqdm import tqdm

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.memory import MemoryPlan, kv_cache_bytes
from magicdec.engine.decode import FixedGamma, GammaPolicy, decode_plain, decode_speculative
from magicdec.engine.outputs import GenerationResult, RequestOutput, RunStats
from magicdec.engine.prefill import prefill
from magicdec.engine.sampling import SamplingParams, next_tokens
from magicdec.engine.state import BatchState, Stopper
from magicdec.loading import LoadedModel, load_model
from magicdec.spec.config import SpecConfig
from magicdec.spec.factory import DraftSetup, plan_drafter

Prompt = str | Sequence[int]


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
    ) -> None:
        """`model`: a Hugging Face checkpoint directory, a .gguf file, or None for the built-in model.
        `memory_budget`: bytes that weights plus caches may use (default: what the device has free)."""
        self.loaded = loaded or load_model(model, dtype, device)
        self.model, self.tokenizer, self.config = self.loaded.model, self.loaded.tokenizer, self.loaded.config
        self.device, self.dtype = self.model.device, self.model.dtype
        self.prefill_chunk, self.memory_budget = prefill_chunk, memory_budget
        eos = set(self.config.eos_token_ids)
        if not eos and self.tokenizer.token_id(self.tokenizer.eos_token) is not None:
            eos = {self.tokenizer.token_id(self.tokenizer.eos_token)}
        self.eos_token_ids: set[int] = eos
        self._draft_models: dict[str, LoadedModel] = {}

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
        params = params or SamplingParams()
        spec = spec or SpecConfig()
        ids = self.encode(prompts)
        self._check_context(ids, params)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        sorted_ids = [ids[i] for i in order]
        lens = [len(p) for p in sorted_ids]
        gamma_max = spec.max_gamma if spec.enabled else 0
        capacity = lens[0] + params.max_new_tokens + gamma_max + 1

        draft = plan_drafter(self, spec, len(ids), capacity) if spec.enabled else None
        self._memory_plan(len(ids), capacity, compare and spec.enabled, draft).check(self.device, self.memory_budget)

        cache = DenseKVCache.for_model(self.model, len(ids), capacity)
        tokens = torch.zeros((len(ids), capacity + 2), dtype=torch.long, device=self.device)
        for r, p in enumerate(sorted_ids):
            tokens[r, : len(p)] = torch.tensor(p)
        stats = RunStats(batch=len(ids), prompt_tokens=sum(lens), method=spec.method)
        generator = params.generator(self.device)

        t0 = time.perf_counter()
        last = prefill(self.model, cache, tokens, lens, self.prefill_chunk)
        first = next_tokens(last, params, generator)
        lengths = torch.tensor(lens, device=self.device)
        tokens.scatter_(1, lengths[:, None], first[:, None])
        stats.prefill_s = time.perf_counter() - t0

        stopper = Stopper(self.tokenizer, params, self.eos_token_ids)
        outputs = [RequestOutput(order[r], sorted_ids[r]) for r in range(len(ids))]
        for out, tok in zip(outputs, first.tolist()):
            stopper.extend(out, [tok])
        state = BatchState(list(outputs), tokens, lengths)
        snapshot = (cache.clone(), state.clone()) if compare and spec.enabled else None

        with tqdm(total=len(ids) * params.max_new_tokens, desc="decode", unit="tok", delay=2,
                  disable=not progress, leave=False) as bar:
            bar.update(sum(len(o.token_ids) for o in outputs))
            if draft is None:
                decode_plain(self.model, cache, state, params, generator, stopper, stats, bar.update)
            else:
                t1 = time.perf_counter()
                drafter = draft.build()
                drafter.prefill(self.model, cache, tokens, lens, self.prefill_chunk)
                stats.draft_prefill_s = time.perf_counter() - t1
                policy = gamma_policy or FixedGamma(int(spec.gamma))
                decode_speculative(self.model, cache, drafter, state, params, generator, stopper, stats, policy,
                                   bar.update)
        stats.generated_tokens = sum(len(o.token_ids) for o in outputs)
        result = GenerationResult(self._finish(outputs, stopper), stats)
        if snapshot is not None:
            result.baseline, plain_tokens = self._baseline(snapshot, params, stopper, progress)
            if params.greedy:
                stats.extra["matches_plain"] = plain_tokens == [o.token_ids for o in result.outputs]
        return result

    def _baseline(
        self, snapshot: tuple[DenseKVCache, BatchState], params: SamplingParams, stopper: Stopper, progress: bool
    ) -> tuple[RunStats, list[list[int]]]:
        cache, state = snapshot
        outputs = list(state.outputs)
        stats = RunStats(batch=len(outputs), prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs))
        generator = params.generator(self.device)
        with tqdm(total=len(outputs) * params.max_new_tokens, desc="plain", unit="tok", delay=2,
                  disable=not progress, leave=False) as bar:
            decode_plain(self.model, cache, state, params, generator, stopper, stats, bar.update)
        stats.generated_tokens = sum(len(o.token_ids) for o in outputs)
        return stats, [o.token_ids for o in sorted(outputs, key=lambda o: o.index)]

    def _finish(self, outputs: list[RequestOutput], stopper: Stopper) -> list[RequestOutput]:
        for out in outputs:
            stopper.finalize(out)
        return sorted(outputs, key=lambda o: o.index)

    def _memory_plan(self, batch: int, capacity: int, twice: bool, draft: DraftSetup | None) -> MemoryPlan:
        cfg = self.config
        target = kv_cache_bytes(cfg.n_layers, batch, self.model.kv_heads, cfg.head_dim, capacity + 1, self.dtype)
        plan = MemoryPlan(to_allocate={"target KV cache": target})
        if twice:
            plan.to_allocate["baseline KV cache copy"] = target
        if draft is not None:
            plan.to_allocate["draft KV cache"] = draft.cache_bytes
        return plan
