"""A batch ready to decode: the target's KV cache, each sequence's history and the stop rules.

There is one way to build one: `Batch.allocate` reserves the cache for prompts sorted longest first,
then either `prefill` runs the prompts through the model (in stages, if asked: each stage hands out
a batch whose prompts are the prefixes prefilled so far, as the benchmark's prefix prefill does), or
`fill_random` fills the cache with random keys and values as if a prompt had been prefilled (step
costs do not depend on the values: profiling and systems benchmarks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.memory import MemoryPlan, kv_cache_bytes
from magicdec.engine.outputs import RequestOutput
from magicdec.engine.state import BatchState, Stopper, check_finite
from magicdec.model.llama import Transformer
from magicdec.runtime.prefill import prefill
from magicdec.runtime.sampling import SamplingParams, next_tokens


def cache_capacity(longest_prompt: int, max_new_tokens: int, max_gamma: int) -> int:
    """Positions a sequence can reach: its prompt, its new tokens, and one round's drafts past the last."""
    return longest_prompt + max_new_tokens + max_gamma + 1


def target_cache_bytes(model: Transformer, rows: int, capacity: int) -> int:
    return kv_cache_bytes(model.config, model.kv_heads, rows, capacity + 1, model.dtype)


def prefill_transient_bytes(model: Transformer, rows: int, chunk: int, capacity: int) -> int:
    """What a prefill forward holds beside the caches, at its largest: a chunk's visibility masks over the
    cache ([rows, chunk, capacity] booleans, built in a few steps) and the keys and values expanded to
    every query head for attention (SDPA does not materialise the scores)."""
    cfg = model.config
    heads = cfg.n_heads * model.kv_heads // cfg.n_kv_heads  # this device's query heads
    masks = 4 * rows * chunk * (capacity + 1)
    expanded = 2 * rows * heads * (capacity + 1) * cfg.head_dim * max(4, model.dtype.itemsize)
    return masks + expanded


@dataclass(slots=True)
class Batch:
    """Rows are sorted longest prompt first (`order[r]` is row r's index in the caller's list)."""

    cache: DenseKVCache
    tokens: torch.Tensor  # [B, capacity + 2]: prompt, generated tokens, the pending token; a trash column
    prompts: list[list[int]]
    order: list[int]
    params: SamplingParams
    stopper: Stopper
    max_gamma: int
    state: BatchState | None = None  # set once the first tokens are picked
    prefilled: int = 0  # positions of every prompt in the cache so far
    prefill_s: float = 0.0
    rng_state: torch.Tensor | None = None  # the sampler's state after the first tokens
    decoded: bool = False  # decoding consumes a batch (its rows move as sequences finish): fork to reuse one

    @classmethod
    def allocate(cls, model: Transformer, prompts: list[list[int]], params: SamplingParams, stopper: Stopper,
                 max_gamma: int = 0, budget: int | None = None, plan: MemoryPlan | None = None,
                 chunk: int = 512) -> Batch:
        """Check the memory plan (what `plan` holds already, e.g. the weights, plus the target cache and the
        transients of a prefill in chunks of `chunk`) against the device and `budget`, then allocate."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        rows = [prompts[i] for i in order]
        capacity = cache_capacity(len(rows[0]), params.max_new_tokens, max_gamma)
        plan = plan or MemoryPlan()
        plan.to_allocate["target KV cache"] = target_cache_bytes(model, len(rows), capacity)
        plan.to_allocate["prefill masks and expanded KV (transient)"] = prefill_transient_bytes(
            model, len(rows), min(chunk, len(rows[0])), capacity)
        plan.check(model.device, budget)
        cache = DenseKVCache.for_model(model, len(rows), capacity)
        tokens = torch.zeros((len(rows), capacity + 2), dtype=torch.long, device=model.device)
        for r, p in enumerate(rows):
            tokens[r, : len(p)] = torch.tensor(p)
        return cls(cache, tokens, rows, order, params, stopper, max_gamma)

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @torch.inference_mode()
    def prefill(self, model: Transformer, chunk: int, generator: torch.Generator | None = None,
                until: int | None = None, progress: Callable[[int], None] | None = None) -> Batch:
        """Run the prompts through `model`, then pick each sequence's first token. With `until`, stop at
        that many positions (equal-length prompts; later calls continue from there) and return a batch
        of the prefixes, which shares this batch's cache; without, prefill everything and return self."""
        lens = self.prompt_lens
        end = lens[0] if until is None else until
        if until is not None and (len(set(lens)) != 1 or not self.prefilled < until <= lens[0]):
            raise ValueError(f"staged prefill takes equal-length prompts and increasing stages: "
                             f"{self.prefilled} → {until} of {lens[0]}")
        if generator is None and not self.params.greedy:  # sampling needs a stream, to continue while decoding
            generator = self.params.generator(self.device)
        t0 = time.perf_counter()
        stage = lens if until is None else [end] * len(lens)
        last = prefill(model, self.cache, self.tokens, stage, chunk, start=self.prefilled, progress=progress)
        check_finite(last.isnan().any(-1).tolist(), "after the prompt")
        first = next_tokens(last, self.params, generator)
        self.prefill_s += time.perf_counter() - t0
        self.prefilled = end
        out = self
        if until is not None:
            out = replace(self, tokens=self.tokens.clone(), prompts=[p[:end] for p in self.prompts])
            out.tokens[:, end:] = 0
        out._start(first, generator)
        return out

    def fill_random(self, context: int, vocab_size: int, seed: int = 0) -> Batch:
        """As if `context` random prompt tokens had been prefilled (random KV): for step timing only."""
        self.cache.k[:, :, :, :context].normal_(std=0.5)
        self.cache.v[:, :, :, :context].normal_(std=0.5)
        g = torch.Generator().manual_seed(seed)
        self.tokens.copy_(torch.randint(3, vocab_size, self.tokens.shape, generator=g))
        self.prompts = [row[:context] for row in self.tokens.tolist()]
        self.prefilled = context
        self._start(self.tokens[:, context].clone(), None)
        return self

    def _start(self, first: torch.Tensor, generator: torch.Generator | None) -> None:
        lengths = torch.tensor(self.prompt_lens, device=self.device)
        self.tokens.scatter_(1, lengths[:, None], first[:, None])
        outputs = [RequestOutput(self.order[r], p) for r, p in enumerate(self.prompts)]
        for out, tok in zip(outputs, first.tolist()):
            self.stopper.extend(out, [tok])
        self.state = BatchState(outputs, self.tokens, lengths)
        self.rng_state = generator.get_state() if generator is not None else None

    def generator(self) -> torch.Generator | None:
        """The sampling generator, continuing the stream that drew the first tokens (a second stream with
        the same seed would repeat those draws and correlate the first tokens with the next ones)."""
        if self.rng_state is None:
            return None
        g = torch.Generator(device=self.device)
        g.set_state(self.rng_state)
        return g

    def fork(self, params: SamplingParams | None = None, stopper: Stopper | None = None,
             into: DenseKVCache | None = None, plan: MemoryPlan | None = None, budget: int | None = None) -> Batch:
        """A copy to decode, leaving this batch reusable (decoding moves rows of the cache as sequences
        finish). `into`: a cache of the same shape to copy into (keeps CUDA graphs' buffers); `params`
        and `stopper` replace this batch's (e.g. fewer new tokens for a warm-up run). A new copy is checked
        against the memory `plan` (what is resident already) and `budget` first."""
        if self.state is None:
            raise ValueError("fork a batch after its prefill")
        if into is None or into.k.shape != self.cache.k.shape:
            plan = plan or MemoryPlan()
            plan.to_allocate["working copy of the KV cache"] = self.cache.nbytes
            plan.check(self.device, budget)
            into = self.cache.clone()
        else:
            into.copy_(self.cache)
        return replace(self, cache=into, state=self.state.clone(), params=params or self.params,
                       stopper=stopper or self.stopper, decoded=False)
