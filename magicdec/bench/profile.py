"""Measuring step times on this device, for `magicdec profile` (fitted by `magicdec.costmodel.fit`).

Step costs do not depend on the values in the KV cache, so no prompt is prefilled: caches are
filled with random keys and values up to the context being measured. Each point records
- "target": one plain decoding step of the engine (forward, sampling, bookkeeping);
- "verify": one target forward of γ+1 tokens per sequence;
- "draft": one draft forward of 1 token per sequence over the drafter's cache;
- "round": one whole speculation round of the engine (γ drafts, verification, commit), with
  synthetic acceptance so that rounds look alike whatever the random weights say.
Times are medians over repeats after a warm-up, synchronised on CUDA.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from magicdec.bench.synthetic import synthetic_verifier
from magicdec.cache.dense import DenseKVCache
from magicdec.cache.memory import OutOfMemoryPlan
from magicdec.cache.sparse import SparseKVCache
from magicdec.engine.batch import Batch
from magicdec.llm import LLM
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import SpecConfig
from magicdec.spec.factory import plan_drafter

SYNTHETIC_ALPHA = 0.8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_batch(llm: LLM, batch: int, context: int, steps: int, max_gamma: int) -> Batch:
    """A batch as if `context` prompt tokens had been prefilled (random KV), ready to decode `steps` tokens."""
    params = SamplingParams(max_new_tokens=steps, ignore_eos=True)
    prompts = [[0] * context] * batch
    pre = Batch.allocate(llm.model, prompts, params, llm.stopper(params), max_gamma, llm.memory_budget,
                         llm.memory_plan(), llm.prefill_chunk)
    return pre.fill_random(context, llm.config.vocab_size)


def measure_point(llm: LLM, batch: int, context: int, gammas: list[int], spec: SpecConfig, repeats: int = 3,
                  steps: int = 6) -> Iterator[dict[str, Any]]:
    """Yield the "target", "verify", "draft" and "round" records of one (batch, context) point."""
    dev = llm.device
    max_gamma = max(gammas)
    pre = random_batch(llm, batch, context, steps * (max_gamma + 1), max_gamma)
    point = {"batch": batch, "context": context}
    work = pre.fork()

    def limited(tokens: int) -> Batch:
        params = SamplingParams(max_new_tokens=tokens + 1, ignore_eos=True)
        return pre.fork(params, llm.stopper(params), into=work.cache)

    plain = [llm.decode(limited(steps)).stats.decode_s / steps for _ in range(repeats + 1)]
    yield {**point, "kind": "target", "gamma": 0, "seconds": statistics.median(plain[1:])}

    # the forwards the engine runs (CUDA-graph replays on CUDA), on the same inputs
    ids = pre.tokens[:, : max_gamma + 1]
    pos = torch.arange(context, context + max_gamma + 1, device=dev).expand(batch, -1)
    with torch.inference_mode():
        for g in gammas:
            secs = timed(lambda g=g: llm.runner(ids[:, : g + 1], pos[:, : g + 1], pre.cache).argmax(-1), dev, repeats)
            yield {**point, "kind": "verify", "gamma": g, "seconds": secs}
        model, forward = llm.drafting(spec)
        drafter = plan_drafter(spec, model, forward, batch, pre.cache.capacity, llm.config.vocab_size).build()
        fill_random(drafter.cache, context)
        index = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        secs = timed(lambda: drafter.forward(ids[:, :1], pos[:, :1], drafter.cache, logits_index=index).argmax(-1),
                     dev, repeats)
        yield {**point, "kind": "draft", "gamma": 0, "seconds": secs}

    synthetic = synthetic_verifier(SYNTHETIC_ALPHA)
    for g in gammas:
        cfg = replace(spec, gamma=g)
        runs = []
        for _ in range(repeats + 1):
            r = llm.decode(limited(steps * (g + 1)), cfg, verifier=synthetic)
            runs.append(r.stats.decode_s / max(r.stats.acceptance.rounds / batch, 1))
        yield {**point, "kind": "round", "gamma": g, "seconds": statistics.median(runs[1:])}
    llm.release_graphs()  # the graphs captured here point at this point's buffers


def fill_random(cache: SparseKVCache | DenseKVCache, context: int) -> None:
    """Random KV (and the slot tags) a draft cache would have after `context` tokens (costs, not values)."""
    if isinstance(cache, DenseKVCache):
        cache.k[:, :, :, :context].normal_(std=0.5)
        cache.v[:, :, :, :context].normal_(std=0.5)
        return
    cache.k.normal_(std=0.5)
    cache.v.normal_(std=0.5)
    dev = cache.k.device
    kept = torch.arange(min(cache.n_kept, context), device=dev)
    recent = torch.arange(max(context - cache.window, kept.numel()), context, device=dev)
    positions = torch.cat([kept, recent]).expand(cache.k.shape[1], -1)
    cache.reset()
    cache.tag(cache.slot_of(positions), positions)


def measure(llm: LLM, batches: list[int], contexts: list[int], gammas: list[int], spec: SpecConfig,
            repeats: int = 3, on_skip: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Every point of the grid that fits in memory (the others are reported to `on_skip`)."""
    for b in batches:
        for c in contexts:
            try:
                yield from measure_point(llm, b, c, gammas, spec, repeats)
            except (OutOfMemoryPlan, torch.OutOfMemoryError) as e:
                if on_skip:
                    on_skip(f"batch {b} × context {c}: {e}")
