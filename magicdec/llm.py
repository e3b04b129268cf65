"""The offline API: load a model once, then generate for lists of prompts — a client of the engine core.

    from magicdec import LLM, SamplingParams, SpecConfig
    llm = LLM()                                    # built-in SmolLM2-135M-Instruct
    result = llm.generate(["It is a truth"], SamplingParams(max_new_tokens=32),
                          spec=SpecConfig(method="self", budget=512, gamma=3))
    result.outputs[0].text, result.stats.tokens_per_s, result.stats.acceptance_rate

`generate` builds an `EngineCore` (the core `magicdec serve` and `magicdec.Engine` run: continuous batching
over a paged KV cache) from an `EngineConfig` sized for its prompts, queues every prompt at once and steps
until all have finished (`run`). The γ policy is a fixed γ, or for `gamma="auto"` the cost model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from magicdec.engine.config import EngineConfig
from magicdec.engine.core import EngineCore
from magicdec.engine.models import ModelSet, Prompt, PromptError
from magicdec.engine.outputs import GenerationResult, RunStats, StepOutput
from magicdec.loading import LoadedModel
from magicdec.parallel.tp import TensorParallel
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import SpecConfig

__all__ = ["LLM", "Prompt", "PromptError"]


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
        device has free). `tp`: this process's rank in a tensor-parallel group (see `magicdec.parallel`);
        `draft_tp`: a draft model "sharded" like the target, "replicated" on every rank, or "auto"."""
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer ≥ 1 token, got {prefill_chunk!r}")
        self.models = ModelSet(model, dtype=dtype, device=device, memory_budget=memory_budget, loaded=loaded, tp=tp,
                               draft_tp=draft_tp)
        m = self.models
        self.loaded, self.model, self.tokenizer, self.config = m.loaded, m.model, m.tokenizer, m.config
        self.device, self.dtype, self.tp = m.device, m.dtype, m.tp
        self.prefill_chunk = prefill_chunk

    # the engine's models own these; setting them here changes what the next core uses
    @property
    def eos_token_ids(self) -> set[int]:
        return self.models.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:
        self.models.eos_token_ids = set(ids)

    @property
    def memory_budget(self) -> int | None:
        return self.models.memory_budget

    @memory_budget.setter
    def memory_budget(self, budget: int | None) -> None:
        self.models.memory_budget = budget

    # ---- prompts ---------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt (a str is tokenized; token ids are checked against the vocabulary)."""
        return self.models.encode(prompts)

    def check_context(self, ids: list[list[int]], params: SamplingParams) -> None:
        limit = self.config.max_position_embeddings
        for i, p in enumerate(ids):
            total = len(p) + params.max_new_tokens
            if total > limit:
                raise PromptError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} that is {total} "
                    f"positions, beyond the model's context of {limit}. Shorten the prompt or lower max_new_tokens."
                )

    # ---- the engine core -------------------------------------------------------------------------
    def engine_config(self, spec: SpecConfig | None = None, **knobs: object) -> EngineConfig:
        """An `EngineConfig` with this LLM's prefill chunk (unless `knobs` set one)."""
        return EngineConfig(spec=spec, **{"prefill_chunk": self.prefill_chunk, **knobs})  # type: ignore[arg-type]

    def core(self, config: EngineConfig) -> EngineCore:
        """An engine core over this LLM's models, as `config` says."""
        return EngineCore.from_config(self.models, config)

    def core_for(self, ids: list[list[int]], params: SamplingParams, spec: SpecConfig | None, runs: int = 1,
                 **knobs: object) -> EngineCore:
        """A core for these prompts at once: every one running together, the pool sized for `runs` runs of all
        of them (later runs find the prompts in the prefix cache)."""
        bound = spec.gamma_bound if spec is not None and spec.enabled else 0
        lengths = [len(p) + params.max_new_tokens for p in ids]
        sized = dict(max_num_seqs=len(ids), max_num_batched_tokens=len(ids) * (bound + 1) + self.prefill_chunk,
                     max_model_len=max(lengths), pool_lengths=tuple(lengths * runs))
        return self.core(self.engine_config(spec, **{**sized, **knobs}))

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None,
                 spec: SpecConfig | None = None, *, progress: bool = False) -> GenerationResult:
        """Generate for every prompt with `spec`'s speculation: all prompts queued at once in an engine core
        (continuous batching over the paged KV cache). A seeded `params` gives prompt i the seed `seed + i`.
        A request that fails on its own (e.g. NaN logits) raises its error here."""
        check_arguments(params, spec)
        spec, params = spec or SpecConfig(), params or SamplingParams()
        ids = self.encode(prompts)
        self.check_context(ids, params)
        core = self.core_for(ids, params, spec)
        try:
            return self.run(core, ids, params, progress=progress)
        finally:
            core.close()

    def run(self, core: EngineCore, ids: list[list[int]], params: SamplingParams,
            progress: bool = False, random_kv: bool = False) -> GenerationResult:
        """Queue every prompt in `core`, step until all have finished; outputs in the prompts' order. A seeded
        `params` gives prompt i the seed `seed + i`. Prefill time is the steps' prefill chunks, decode time the
        rest (graph captures excluded); `steady_tokens_per_s` counts the steps where every request decoded and
        none prefilled. `random_kv`: the prompts' KV is random, not prefilled (systems benchmarks; see
        `EngineCore.add_request`)."""
        spec = core.spec or SpecConfig()
        rows = len(ids)
        order = [core.add_request(p, replace(params, seed=None if params.seed is None else params.seed + i),
                                  random_kv=random_kv) for i, p in enumerate(ids)]
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
                    if out.finish_reason == "error":  # a request failed: so does the generation, with its error
                        for rid in list(core.requests):
                            core.abort_request(rid)
                        raise RuntimeError(f"prompt {order.index(out.request_id)} failed: {out.error}")
                report = core.last_report
                assert report is not None
                busy = report.seconds - report.capture_s
                stats.prefill_s += report.prefill_s
                stats.decode_s += busy - report.prefill_s
                if report.gamma:
                    stats.draft_s += report.draft_s
                    stats.verify_s += report.verify_s
                if spec.enabled and report.request_ids:
                    stats.gamma_history.append(report.gamma)
                if len(report.request_ids) == rows and not report.prefill_tokens:
                    steady_s += busy
                    steady_tokens += report.new_tokens
        outputs = [final[rid] for rid in order]
        for o in outputs:
            stats.acceptance.merge(o.spec)
        stats.generated_tokens = sum(len(o.token_ids) for o in outputs)
        stats.extra.update(engine="continuous", steady_tokens_per_s=steady_tokens / steady_s if steady_s else 0.0,
                           prefix_cached_tokens=sum(o.metrics.cached_tokens for o in outputs))
        if core.policy is not None:
            stats.extra.update(core.policy.stats())
        core.pool.check_empty()
        return GenerationResult(outputs, stats)

    # ---- drafts -----------------------------------------------------------------------------------
    def add_draft_model(self, name: str, draft: LoadedModel) -> None:
        """Make an already-loaded model (e.g. random weights for a systems benchmark) the draft model that
        `SpecConfig(method="draft", draft_model=name)` names."""
        self.models.add_draft_model(name, draft)
