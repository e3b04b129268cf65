"""The online engine: requests that arrive at any time, served by continuous batching with speculation.

    from magicdec import Engine, SamplingParams, SpecConfig
    engine = Engine(spec=SpecConfig(method="self", budget=256, gamma="auto"))
    rid = engine.add_request("It is a truth", SamplingParams(max_new_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.new_text, out.finished)

The names are vLLM's (`add_request`, `abort_request`, `step`, `has_unfinished_requests`); `stream` iterates
over one request's deltas, `generate` is its asyncio counterpart: several coroutines may stream at once, all
fed by one stepping task that the engine owns (it runs the steps in a worker thread while any request is
left, puts each output in its stream's queue, ends when no request is left, and the next request starts it
again), as the server's `EngineRunner` does with its thread. A consumer only awaits its own queue: a request
that waits for room (`max_num_seqs`, the pool, a preemption) never stalls the others, and a consumer that is
cancelled or closes its stream early aborts its own request and nothing else. Do not call the synchronous
methods (`step`, `stream`, `run`) while `generate` streams are open. The engine owns every request's state:
the paged KV cache and its prefix cache, the scheduler, the per-request γ policy
(`magicdec.costmodel.policy.RequestGamma` over the cost model of `gamma="auto"`, or a fixed γ).

Outputs are deltas (`StepOutput`): `new_token_ids` and `new_text` each step, the whole `token_ids` and `text`
on the final output only. A request that fails on its own ends with finish_reason "error" (`StepOutput.error`);
an engine-wide fault propagates (to every open `generate` stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import torch

from magicdec.cache.blocks import PrefixStats
from magicdec.cache.memory import fmt_bytes
from magicdec.engine.config import BLOCK_MULTIPLE, EngineConfig
from magicdec.engine.core import EngineStats, StepReport
from magicdec.engine.outputs import StepOutput
from magicdec.engine.request import RequestSpec
from magicdec.home.locks import say
from magicdec.llm import LLM, Prompt
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import SpecConfig

DEFAULT_BLOCK_SIZE = BLOCK_MULTIPLE  # tokens per KV block: a multiple of the CPU kernel's 64-slot key blocks


class Engine:
    def __init__(
        self,
        model: str | Path | None = None,
        spec: SpecConfig | None = None,
        *,
        llm: LLM | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 1024,
        prefill_chunk: int = 512,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        cuda_graphs: bool | None = None,
        release_windows: bool = True,
        quiet: bool = False,
    ) -> None:
        """`model`: as for `LLM` (or an `llm` already loaded). `spec`: the engine's speculation (None: plain
        decoding). The KV pool takes `num_blocks` blocks of `block_size` tokens, or as many as `kv_cache_memory`
        bytes hold, or a share of the free memory (never more than `max_num_seqs` requests at the model's
        context need). `cuda_graphs`: replay decode-shaped forwards as CUDA graphs (default: on CUDA).
        `release_windows`: on a model with global and sliding layers, a sliding layer holds its window only
        (prefix caching off); False keeps every block (and the prefix cache)."""
        config = EngineConfig(spec=spec, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              prefill_chunk=prefill_chunk, block_size=block_size, num_blocks=num_blocks,
                              kv_cache_memory=kv_cache_memory, enable_prefix_caching=enable_prefix_caching,
                              max_model_len=max_model_len, cuda_graphs=cuda_graphs,
                              release_windows=release_windows)  # checked before loading
        self.llm = llm or LLM(model, dtype=dtype, device=device, prefill_chunk=prefill_chunk)
        self.core = self.llm.core(config)
        self.max_model_len = self.core.max_model_len
        # `generate`'s streams (bound to the event loop they run in): queues by request id, the stepping task,
        # the requests whose consumers left (aborted before the next step), an engine-wide fault
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._stepper: asyncio.Task[None] | None = None
        self._step_lock: asyncio.Lock | None = None
        self._leaving: list[str] = []
        self._fault: BaseException | None = None
        if not quiet:
            cache, drafter = self.core.cache, self.core.runner.drafter
            blocks, P = cache.num_blocks, cache.block_size
            per_block = cache.nbytes // (blocks + 1)
            if drafter is not None and drafter.pool is not None:
                per_block += drafter.pool.nbytes // (blocks + 1)
            ctx = min(self.max_model_len, 8192)
            rings = self.core.scheduler.ring_sizes
            if rings:  # per request: blocks for the context (global layers) and each sliding group's ring
                need = self.core.scheduler.blocks_needed(ctx)
                say(f"KV cache: {blocks} blocks × {P} tokens ({fmt_bytes(blocks * per_block)}), global layers in "
                    f"one group, sliding layers in {len(rings)} of ≤ {max(rings)} blocks per request; maximum "
                    f"concurrency for {ctx}-token requests: {blocks / need:.2f}×; prefix caching off (sliding layers "
                    "keep only their window: release_windows=False / serve --keep-windows keep every block)")
            else:
                say(f"KV cache: {blocks} blocks × {P} tokens = {blocks * P} tokens ({fmt_bytes(blocks * per_block)}); "
                    f"maximum concurrency for {ctx}-token requests: {blocks * P / ctx:.2f}×")

    @property
    def spec(self) -> SpecConfig | None:
        return self.core.spec

    def set_spec(self, spec: SpecConfig | None) -> None:
        """Change the engine's speculation between requests (e.g. to compare drafters on prompts served from the
        prefix cache); refused while requests are in flight."""
        self.core.set_speculation(spec)

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, spec: RequestSpec | int | None = None,
                    request_id: str | None = None, arrival: float | None = None, checked: bool = False) -> str:
        """Queue a request: a prompt (text or token ids), its sampling parameters, and optionally its own
        speculation (0: off; k: always γ = k; or a `RequestSpec`). Checked now (a bad request is refused before
        it waits) unless the caller ran `check_request` on it already (`checked`)."""
        ids = self.llm.encode([prompt])[0]
        if isinstance(spec, bool):
            raise TypeError(f"spec must be a RequestSpec, an int γ or None, got bool: {spec}")
        if isinstance(spec, int):
            spec = RequestSpec(spec)
        return self.core.add_request(ids, params or SamplingParams(), spec, request_id, arrival, checked)

    def check_request(self, prompt: list[int], params: SamplingParams, spec: RequestSpec | None = None) -> None:
        """Refuse, with the reason and the fix, a request the engine cannot serve (the server calls it once,
        before queueing)."""
        self.core.check_request(prompt, params, spec)

    def abort_request(self, request_id: str) -> None:
        self.core.abort_request(request_id)

    def step(self) -> list[StepOutput]:
        """Run one step; the requests that advanced (new tokens, finished, or aborted), with their deltas."""
        return self.core.step()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # ---- streams -----------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               spec: RequestSpec | int | None = None) -> Iterator[StepOutput]:
        """Add a request and step the engine until it finishes, yielding its deltas (other requests advance too);
        closing the iterator early (`close()`, or leaving a for loop) aborts the request and frees its blocks."""
        rid = self.add_request(prompt, params, spec)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
                        if finished:
                            break
        finally:
            if not finished:
                self.abort_request(rid)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       spec: RequestSpec | int | None = None,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """One request's deltas as an async stream, fed by the engine's stepping task; closing the stream
        early, or cancelling its consumer, aborts the request (its blocks are free before the next step)."""
        lock = self._bind_loop()
        async with lock:  # never beside a step running in its thread
            rid = self.add_request(prompt, params, spec, request_id)
            queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
            self._queues[rid] = queue
        self._start_stepping()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):  # an engine-wide fault
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            self._queues.pop(rid, None)
            if not finished:  # the consumer left: abort before the next step (no await here: a closing generator)
                self._leaving.append(rid)
                self._start_stepping()

    def _bind_loop(self) -> asyncio.Lock:
        """The lock that keeps requests from being added beside a step, for the running event loop."""
        loop = asyncio.get_running_loop()
        if self._fault is not None:
            raise RuntimeError(f"the engine failed earlier ({type(self._fault).__name__}: {self._fault}); "
                               "create a new Engine")
        if loop is not self._loop or self._step_lock is None:
            if self._stepper is not None and not self._stepper.done():
                raise RuntimeError("this engine is streaming in another event loop; use one loop per engine")
            for rid in self._leaving:  # streams the last loop closed as it ended
                self.core.abort_request(rid)
            self._loop, self._step_lock, self._queues, self._leaving = loop, asyncio.Lock(), {}, []
        return self._step_lock

    def _start_stepping(self) -> None:
        if self._stepper is None or self._stepper.done():
            try:
                self._stepper = asyncio.get_running_loop().create_task(self._stepping())
            except RuntimeError:  # no loop any more (a stream finalized at shutdown): nothing to feed
                pass

    async def _stepping(self) -> None:
        """The engine's stepping task: apply the aborts of consumers that left, run a step in a worker thread,
        put each output in its stream's queue; end when no request is left."""
        assert self._step_lock is not None
        try:
            while True:
                async with self._step_lock:
                    for rid in self._leaving:
                        self.core.abort_request(rid)
                    self._leaving.clear()
                    if self.core.idle:
                        return
                    outs = await asyncio.to_thread(self.core.step)
                for out in outs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
        except Exception as e:  # an engine-wide fault: every open stream ends with it
            self._fault = e
            for queue in self._queues.values():
                queue.put_nowait(e)

    def run(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
            ) -> list[StepOutput]:
        """Add every prompt now and step until all finish; their final outputs in the prompts' order."""
        each = params if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, q) for p, q in zip(prompts, each)]
        final: dict[str, StepOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    # ---- state -------------------------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    @property
    def prefix_cache(self) -> PrefixStats:
        return self.core.pool.stats

    @property
    def kv_cache_usage(self) -> float:
        return self.core.pool.usage

    @property
    def num_running(self) -> int:
        return self.core.num_running

    @property
    def num_waiting(self) -> int:
        return self.core.num_waiting

    @property
    def last_step(self) -> StepReport | None:
        """What the last step did: each decoding request's γ and accepted drafts, prefill tokens, timings."""
        return self.core.last_report

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's /reset_prefix_cache) and the recent outputs suffix drafts propose
        from: later prompts are computed and drafted afresh."""
        self.core.pool.clear_prefix_cache()
        self.core.forget_outputs()

    def check_no_leaks(self) -> None:
        """Raise KVLeakError if any KV block is still held while no request is left."""
        if not self.has_unfinished_requests():
            self.core.pool.check_empty()

    def close(self) -> None:
        """Abort every request and free the KV pools now (the engine is unusable after)."""
        self.core.close()
