"""Measuring step times on this device, for `magicdec profile` (fitted by `magicdec.bench.fit`).

Step costs do not depend on the values in the KV cache, so no prompt is prefilled: the engine's requests
hold random keys and values up to the context being measured (`random_kv`). Each point records
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
from magicdec.cache.memory import OutOfMemoryPlan
from magicdec.cache.paged import PagedView
from magicdec.engine.core import EngineCore
from magicdec.llm import LLM
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import SpecConfig

SYNTHETIC_ALPHA = 0.8
KINDS = ("target", "verify", "draft", "round")


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


def random_requests(core: EngineCore, batch: int, context: int, tokens: int) -> list[str]:
    """`batch` requests whose `context` prompt tokens hold random KV (no prefill), each to decode `tokens`,
    stepped until every one decodes."""
    params = SamplingParams(max_new_tokens=tokens + 1, ignore_eos=True)
    ids = [core.add_request([3 + i] * context, params, random_kv=True) for i in range(batch)]
    while any(core.requests[r].to_compute or not core.requests[r].output for r in ids):
        core.step()
    return ids


def step_seconds(core: EngineCore, batch: int, context: int, tokens: int) -> list[float]:
    """Seconds of each step in which all `batch` random-KV requests decoded (graph captures excluded)."""
    random_requests(core, batch, context, tokens)
    out = []
    while core.has_unfinished_requests():
        core.step()
        r = core.last_report
        if r is not None and len(r.request_ids) == batch:
            out.append(r.seconds - r.capture_s)
    return out


def measure_point(llm: LLM, batch: int, context: int, gammas: list[int], spec: SpecConfig, repeats: int = 3,
                  steps: int = 6, kinds: tuple[str, ...] = KINDS,
                  cuda_graphs: bool | None = None) -> Iterator[dict[str, Any]]:
    """Yield the records of one (batch, context) point: of each of `kinds` ("target", "verify", "draft",
    "round"), in that order. `cuda_graphs`: the engine's (None: on CUDA unless MAGICDEC_CUDA_GRAPHS=0)."""
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown step kind {sorted(bad)[0]!r}: choose among {', '.join(KINDS)}")
    max_gamma = max(gammas)
    lengths = [context + steps * (max_gamma + 1) * (repeats + 1) + 2] * batch  # the longest run's tokens fit
    core = llm.core(llm.engine_config(replace(spec, gamma=max_gamma), max_num_seqs=batch,
                                      max_num_batched_tokens=batch * (max_gamma + 1) + llm.prefill_chunk,
                                      max_model_len=max(lengths), pool_lengths=tuple(lengths),
                                      enable_prefix_caching=False, cuda_graphs=cuda_graphs))
    point = {"batch": batch, "context": context}
    try:
        if "target" in kinds:
            core.set_speculation(None)
            plain = step_seconds(core, batch, context, steps * (repeats + 1))
            yield {**point, "kind": "target", "gamma": 0, "seconds": statistics.median(plain[steps:])}
        if "verify" in kinds or "draft" in kinds:
            yield from forward_records(core, point, gammas, spec, repeats, kinds)
        for g in gammas if "round" in kinds else []:
            core.set_speculation(replace(spec, gamma=g), verifier=synthetic_verifier(SYNTHETIC_ALPHA))
            rounds = step_seconds(core, batch, context, steps * (g + 1) * (repeats + 1))
            warm = rounds[min(steps, len(rounds) - 1) :]
            yield {**point, "kind": "round", "gamma": g, "seconds": statistics.median(warm)}
    finally:
        core.close()


def forward_records(core: EngineCore, point: dict[str, Any], gammas: list[int], spec: SpecConfig, repeats: int,
                    kinds: tuple[str, ...] = ("verify", "draft")) -> Iterator[dict[str, Any]]:
    """The "verify" records (a target forward of γ+1 tokens per sequence, for each γ) and the "draft" one (a
    draft forward of 1 token per sequence): the forwards the engine runs (CUDA-graph replays on CUDA), over
    random-KV requests at the point's context."""
    batch, context = point["batch"], point["context"]
    dev = core.model.device
    max_gamma = max(gammas)
    core.set_speculation(replace(spec, gamma=max_gamma))
    rows = [core.requests[r] for r in random_requests(core, batch, context, max_gamma + 2)]
    table = core.cache.table([r.blocks for r in rows])
    ids = torch.tensor([[3] * (max_gamma + 1)] * batch, device=dev)
    pos = torch.arange(context, context + max_gamma + 1, device=dev).expand(batch, -1)
    with torch.inference_mode():
        for g in gammas if "verify" in kinds else []:
            secs = timed(lambda g=g: core.graphs(ids[:, : g + 1], pos[:, : g + 1], PagedView(core.cache, table))
                         .argmax(-1), dev, repeats)
            yield {**point, "kind": "verify", "gamma": g, "seconds": secs}
        if "draft" in kinds:
            drafter = core.runner.drafter
            assert drafter is not None
            start = [r.computed for r in rows]
            view = drafter.view(rows, table, start, start)
            index = torch.zeros((batch, 1), dtype=torch.long, device=dev)
            secs = timed(lambda: drafter.forward(ids[:, :1], pos[:, :1], view, logits_index=index).argmax(-1),
                         dev, repeats)
            yield {**point, "kind": "draft", "gamma": 0, "seconds": secs}
    for r in rows:
        core.abort_request(r.request_id)
    core.step()


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
