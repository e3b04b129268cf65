"""Builds the drafter a `SpecConfig` asks for: which model drafts, over which cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.memory import kv_cache_bytes
from magicdec.cache.sparse import SparseKVCache
from magicdec.costmodel import CostModel, DraftSpec
from magicdec.costmodel.device import device_profile
from magicdec.engine.runner import ModelRunner
from magicdec.loading import LoadedModel, load_model
from magicdec.loading.errors import LoadError
from magicdec.parallel.tp import TensorParallel, check_shardable
from magicdec.spec.config import SpecConfig
from magicdec.spec.drafter import Drafter

if TYPE_CHECKING:
    from magicdec.engine.llm import LLM


@dataclass(slots=True)
class DraftSetup:
    """A drafter's plan: the bytes its cache will take, and how to build it."""

    cache_bytes: int
    build: Callable[[], Drafter]


def draft_placement(llm: LLM, path: str) -> TensorParallel | None:
    """Under tensor parallelism, shard a draft model like the target or replicate it on every rank:
    as asked, or (auto) whichever the cost model predicts drafts faster; a draft that cannot be split
    that many ways is replicated."""
    tp = llm.tp
    if tp is None or llm.draft_tp == "replicated":
        return None
    from magicdec.loading.hf import read_config

    p = Path(path)
    if llm.draft_tp == "sharded":
        return tp
    if not p.is_dir():  # no config to plan with (a GGUF file): replicate
        return None
    cfg = read_config(p)
    try:
        check_shardable(cfg, tp.world)
    except ValueError:
        return None
    profile = device_profile(llm.device, llm.config, llm.dtype)
    costs = {w: CostModel(llm.config, profile, DraftSpec("model", None, cfg, tp=w), llm.dtype.itemsize, tp.world)
             for w in (1, tp.world)}
    return tp if costs[tp.world].t_draft(1, 4096) < costs[1].t_draft(1, 4096) else None


def load_draft_model(llm: LLM, path: str) -> LoadedModel:
    if path not in llm._draft_models:
        draft = load_model(path, llm.dtype, llm.device, tp=draft_placement(llm, path))
        if draft.config.vocab_size != llm.config.vocab_size:
            raise LoadError(
                f"draft model {path} has a vocabulary of {draft.config.vocab_size} tokens but the target has "
                f"{llm.config.vocab_size}; a draft model must share the target's tokenizer"
            )
        llm._draft_models[path] = draft
    return llm._draft_models[path]


def plan_drafter(llm: LLM, spec: SpecConfig, batch: int, capacity: int) -> DraftSetup:
    if spec.method == "self":
        model, forward = llm.model, llm.runner
    else:
        assert spec.draft_model is not None
        model = load_draft_model(llm, spec.draft_model).model
        forward = llm.draft_runners.setdefault(spec.draft_model, ModelRunner(model))
    cfg, kv_heads = model.config, model.kv_heads
    slack = spec.gamma_bound + 2  # room for a round's drafts and the catch-up tokens of "own" mode

    if spec.drafter == "full":
        slots = capacity + 1

        def build() -> Drafter:
            cache = DenseKVCache(cfg.n_layers, batch, kv_heads, cfg.head_dim, capacity, cfg.group_size,
                                 llm.dtype, llm.device)
            return Drafter(model, cache, "own", forward=forward)
    else:
        slots = spec.n_kept + spec.recent_window + slack + 1

        def build() -> Drafter:
            cache = SparseKVCache(
                cfg.n_layers, batch, kv_heads, cfg.head_dim, spec.n_kept, spec.recent_window, slack,
                cfg.group_size, llm.dtype, llm.device, sink_writes=spec.drafter == "streaming",
                positions=spec.positions, rope=model.rope,
            )
            selection = "snapkv" if spec.drafter == "snapkv" else "sinks"
            return Drafter(model, cache, spec.kv_source, selection, spec.observe, spec.pool_kernel, forward)

    return DraftSetup(kv_cache_bytes(cfg.n_layers, batch, kv_heads, cfg.head_dim, slots, llm.dtype), build)
