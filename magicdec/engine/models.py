"""The models an engine runs: the target (loaded once) and, made on demand and kept, what drafts for it —
the target itself, a copy with quantized weights (int8, int4), or a separate draft model — and the γ policy
of a speculation setting. Also what is resident in memory (for memory plans), prompts to token ids, and the
sampling generators (one seed for every tensor-parallel rank).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from magicdec.cache.memory import MemoryPlan
from magicdec.config import ModelConfig
from magicdec.costmodel import CostModel, load_profile
from magicdec.costmodel.device import device_profile
from magicdec.costmodel.placement import check_placement, shard_draft
from magicdec.costmodel.policy import AutoGamma, FixedGamma, GammaPolicy
from magicdec.costmodel.steps import draft_spec
from magicdec.kernels import cpu as cpu_kernels
from magicdec.loading import LoadedModel, load_model
from magicdec.loading.errors import LoadError
from magicdec.model.llama import Transformer
from magicdec.model.quant import quantize_weights, quantized_bytes
from magicdec.parallel.tp import RankZeroGamma, TensorParallel, broadcast_seed
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import Auto, SpecConfig

Prompt = str | Sequence[int]
QUANT_BITS = {"int8": 8, "int4": 4}  # draft_weights → bits


class PromptError(ValueError):
    """A prompt the model cannot take (empty, not text or token ids, or too long for its context)."""


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


class ModelSet:
    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, memory_budget: int | None = None,
                 loaded: LoadedModel | None = None, tp: TensorParallel | None = None, draft_tp: str = "auto") -> None:
        """`model`: a Hugging Face checkpoint directory, a .gguf file, or None for the built-in model (or an
        already `loaded` one). `memory_budget`: bytes that weights, caches and prefill transients may use.
        `tp`: this process's rank in a tensor-parallel group; `draft_tp`: a draft model "sharded" like the
        target, "replicated" on every rank, or "auto" (the cost model's choice)."""
        check_placement(draft_tp)  # before loading anything
        self.tp, self.draft_tp, self.memory_budget = tp, draft_tp, memory_budget
        self.loaded = loaded or load_model(model, dtype, device, tp=tp)
        self.model, self.tokenizer, self.config = self.loaded.model, self.loaded.tokenizer, self.loaded.config
        self.device, self.dtype = self.model.device, self.model.dtype
        eos = set(self.config.eos_token_ids)
        if not eos and self.tokenizer.token_id(self.tokenizer.eos_token) is not None:
            eos = {self.tokenizer.token_id(self.tokenizer.eos_token)}
        self.eos_token_ids: set[int] = eos
        cpu_kernels.ensure_built(self.device)  # a first run compiles them now, not inside the first step's time
        self._drafts: dict[str, LoadedModel] = {}
        self._quantized: dict[str, Transformer] = {}  # self-drafts with quantized weights

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
                    f"prompt {i} has token ids outside the vocabulary of {self.config.vocab_size}: {bad[:5]}")
        return ids

    # ---- drafting ---------------------------------------------------------------------------------
    def drafting(self, spec: SpecConfig) -> Transformer:
        """The model that drafts for `spec`: the target itself, its quantized copy, or a draft model."""
        if spec.method == "self":
            return self.model if spec.draft_weights == "full" else self.quantized(spec.draft_weights)
        assert spec.draft_model is not None
        return self.draft_model(spec.draft_model).model

    def draft_model(self, path: str) -> LoadedModel:
        """A draft model (loaded once), placed under tensor parallelism as `draft_tp` says."""
        if path not in self._drafts:
            shard = self.tp is not None and shard_draft(self.draft_tp, path, self.config, self.tp.world,
                                                        self.device, self.dtype)
            draft = load_model(path, self.dtype, self.device, tp=self.tp if shard else None)
            check_draft_vocabulary(draft, self.loaded)
            self._drafts[path] = draft
        return self._drafts[path]

    def add_draft_model(self, name: str, draft: LoadedModel) -> None:
        """Make an already-loaded model (e.g. random weights for a systems benchmark) the draft model that
        `SpecConfig(method="draft", draft_model=name)` names."""
        check_draft_vocabulary(draft, self.loaded)
        self._drafts[name] = draft

    def quantized(self, weights: str) -> Transformer:
        """The target with its linear layers' weights quantized ("int8" or "int4"; made once, kept beside the
        full weights, sharing the embedding and norms): the self-draft of `draft_weights`."""
        if weights not in self._quantized:
            plan = self.memory_plan()
            plan.to_allocate[f"{weights} draft weights"] = quantized_bytes(self.model, QUANT_BITS[weights])
            plan.check(self.device, self.memory_budget)
            self._quantized[weights] = quantize_weights(self.model, QUANT_BITS[weights])
        return self._quantized[weights]

    def cost_model(self, spec: SpecConfig, draft: ModelConfig) -> CostModel:
        """The cost model of `spec`'s model draft on this device (its profile: `Auto.profile`, a saved
        `magicdec profile`, else a built-in one)."""
        name = spec.gamma.profile if isinstance(spec.gamma, Auto) else None
        profile = load_profile(name) if name else device_profile(self.device, self.config, self.dtype)
        if self.tp_world > 1 and profile.interconnect_bandwidth <= 0:
            # ranks on one host without a profiled link (gloo on a CPU): communication goes through memory;
            # the step times each round measures correct the estimate
            profile = replace(profile, interconnect_bandwidth=profile.mem_bandwidth)
        return CostModel(self.config, profile, draft_spec(spec, draft), dtype_bytes=self.dtype.itemsize,
                         tp=self.tp_world)

    def gamma_policy(self, spec: SpecConfig, draft: ModelConfig) -> GammaPolicy:
        """A fixed γ, or for `Auto` the cost-model policy with this device's profile (under tensor
        parallelism, rank 0's choice for every rank)."""
        if not isinstance(spec.gamma, Auto):
            return FixedGamma(spec.gamma)
        policy = AutoGamma(self.cost_model(spec, draft), spec.gamma.max_gamma)
        return policy if self.tp_world == 1 else RankZeroGamma(policy, self.tp, self.device)

    # ---- memory and randomness ----------------------------------------------------------------------
    def memory_plan(self, resident: dict[str, int] | None = None) -> MemoryPlan:
        """A memory plan holding what is resident already: the weights (target and drafts), and `resident`."""
        weights = sum(t.numel() * t.element_size() for m in (self.model, *(d.model for d in self._drafts.values()))
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
