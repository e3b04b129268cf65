"""The bridge between the asyncio server and the engine: one thread owns the `Engine`.

The engine is not thread-safe, so exactly one thread (`magicdec-engine`) calls it. Its loop:
1. take everything in the inbox (requests to add, requests to abort), waiting when there is no work;
2. `sync` it: under tensor parallelism (torchrun), rank 0 broadcasts the inbox so that every rank adds and
   aborts the same requests before the same step; the other ranks run `follow` (no HTTP, no metrics);
3. add and abort them, then `step()` while there is work (or an abort to report);
4. update the metrics, log finished requests (and a throughput line every `log_interval` seconds while
   busy), and hand the step's outputs to the event loop in one `call_soon_threadsafe`, where each goes to
   its HTTP request's `Stream`.
The event loop side (`submit`, `abort`, `Stream`) never touches the engine: it only posts to the inbox.

Failures: a request the engine could not serve finishes alone, with `finish_reason` "error" and its
message (the handler answers it 500, or ends its stream with an error event); a request the engine refused
on adding gets its error the same way. Only `step()` raising is an engine-wide fault: every open request
fails with it, /health turns 503 and `on_fatal` stops the server.

Streams: a `Stream` keeps, per choice, the deltas its handler has not taken yet, concatenated (and the
latest output, whose full token list and text the engine fills only when it finishes). A reader slower
than the engine therefore costs O(output) memory, however many steps it falls behind, and the engine
thread never waits for it.

Capacity: at most `max_num_seqs` running plus `max_queue` waiting engine requests; `submit` beyond that
raises `QueueFull` (the server answers 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch.distributed as dist

from magicdec.engine.outputs import StepOutput
from magicdec.engine.request import RequestSpec
from magicdec.runtime.logprobs import TokenLogprob
from magicdec.runtime.sampling import SamplingParams
from magicdec.server.metrics import ServerMetrics
from magicdec.server.protocol import APIError
from magicdec.serving import Engine

log = logging.getLogger("magicdec.server")

DISCONNECT_POLL_S = 1.0  # while a request waits for output, how often it checks that its client is still there


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class EngineDead(Exception):
    pass


class ClientGone(Exception):
    pass


class Disconnectable(Protocol):
    async def is_disconnected(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Job:
    """One engine request, checked by the HTTP handler before it is submitted."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    spec: RequestSpec | None
    arrival: float


@dataclass(slots=True)
class Pending:
    """What a choice produced that its handler has not taken yet: the deltas, and the latest output."""

    token_ids: list[int]
    texts: list[str]
    last: StepOutput
    logprobs: list[TokenLogprob] | None = None  # the deltas' log-probabilities (when asked for)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Stream:
    """The outputs of one HTTP request's engine requests (its choices), as (choice index, StepOutput): the
    engine's deltas of a choice not taken yet come out as one, whose `new_token_ids` and `new_text` are
    their concatenation."""

    def __init__(self, runner: EngineRunner, request_ids: list[str]) -> None:
        self.runner, self.request_ids = runner, request_ids
        self.pending: dict[int, Pending] = {}  # choice index → its deltas not taken yet (event loop only)
        self.error: BaseException | None = None
        self.ready = asyncio.Event()
        self.unfinished = set(range(len(request_ids)))

    @property
    def done(self) -> bool:
        return not self.unfinished

    def put(self, index: int, out: StepOutput) -> None:
        """(event loop) One output of choice `index`, joined to what its handler has not taken yet."""
        p = self.pending.get(index)
        if p is None:
            p = self.pending[index] = Pending(list(out.new_token_ids), [out.new_text], out)
            if out.new_logprobs is not None:
                p.logprobs = list(out.new_logprobs)
        else:
            p.token_ids += out.new_token_ids
            p.texts.append(out.new_text)
            p.last = out
            if out.new_logprobs is not None:
                if p.logprobs is None:
                    p.logprobs = []
                p.logprobs += out.new_logprobs  # (in place: a slow reader costs O(output))
        if out.prompt_logprobs is not None:
            p.prompt_logprobs = out.prompt_logprobs
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        """(event loop) The error the handler raises instead of any further output."""
        self.error = error
        self.ready.set()

    def take(self) -> list[tuple[int, StepOutput]]:
        """Everything pending, one output per choice, and nothing pending after."""
        outs = [(i, replace(p.last, new_token_ids=p.token_ids, new_text="".join(p.texts), new_logprobs=p.logprobs,
                            prompt_logprobs=p.prompt_logprobs)) for i, p in self.pending.items()]
        self.pending.clear()
        self.ready.clear()
        return outs

    def abort(self) -> None:
        """Abort the choices not finished yet (their KV blocks are free after the engine's next step)."""
        if self.unfinished:
            self.runner.abort([self.request_ids[i] for i in sorted(self.unfinished)])
            self.unfinished.clear()

    async def outputs(self, client: Disconnectable | None = None) -> AsyncIterator[tuple[int, StepOutput]]:
        """The deltas until every choice has finished; raises ClientGone when `client` disconnects while
        waiting, or the error the request met."""
        check = time.monotonic() + DISCONNECT_POLL_S
        while self.unfinished:
            if client is not None and time.monotonic() >= check:  # (outputs may flow all the time)
                if await client.is_disconnected():
                    raise ClientGone
                check = time.monotonic() + DISCONNECT_POLL_S
            if self.error is not None:
                raise self.error
            if not self.pending:
                timeout = max(check - time.monotonic(), 0.0) if client is not None else None
                try:
                    await asyncio.wait_for(self.ready.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            for index, out in self.take():
                if out.finished:
                    self.unfinished.discard(index)
                yield index, out


class EngineRunner:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, metrics: ServerMetrics | None = None,
                 max_queue: int = 64, log_interval: float = 10.0,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine, self.loop, self.metrics = engine, loop, metrics
        self.capacity = engine.core.config.max_num_seqs + max_queue
        self.log_interval, self.on_fatal = log_interval, on_fatal
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1  # rank 0 of tensor-parallel ranks
        self._inbox: deque[tuple[str, Any]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="magicdec-engine", daemon=True)
        self._count = threading.Lock()
        self.outstanding = 0  # submitted engine requests not finished yet (guarded by _count)
        # event-loop side only
        self._streams: dict[str, tuple[Stream, int]] = {}
        self._resets: dict[int, asyncio.Future[None]] = {}  # prefix-cache resets asked for, by number
        self._reset_number = 0
        self.draining = False
        self.error: BaseException | None = None
        # engine thread only
        self._last_log = time.monotonic()
        self._logged = (0, 0)

    def start(self) -> None:
        self._thread.start()

    # ---- the event loop's side ------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> Stream:
        """Queue checked requests (all or none); raises QueueFull, ShuttingDown or EngineDead."""
        if self.error is not None:
            raise EngineDead(str(self.error))
        if self.draining or self._stopping:
            raise ShuttingDown
        with self._count:
            if self.outstanding + len(jobs) > self.capacity:
                raise QueueFull
            self.outstanding += len(jobs)
        stream = Stream(self, [j.request_id for j in jobs])
        for i, j in enumerate(jobs):
            self._streams[j.request_id] = (stream, i)
        self._post([("add", j) for j in jobs])
        return stream

    def abort(self, request_ids: list[str]) -> None:
        self._post([("abort", r) for r in request_ids])

    async def reset_prefix_cache(self) -> None:
        """Forget the engine's cached prefixes, between two steps (on every rank); returns once done."""
        if self.error is not None:
            raise EngineDead(str(self.error))
        done: asyncio.Future[None] = self.loop.create_future()
        self._reset_number += 1
        self._resets[self._reset_number] = done
        self._post([("reset_prefix_cache", self._reset_number)])
        await done

    def _post(self, ops: list[tuple[str, Any]]) -> None:
        with self._cond:
            self._inbox.extend(ops)
            self._cond.notify()

    def _deliver(self, outs: list[StepOutput], errors: list[tuple[str, BaseException]]) -> None:
        """(event loop) Each output to its stream; a finished request leaves the books."""
        for out in outs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            stream, index = entry
            stream.put(index, out)
            if out.finished:
                del self._streams[out.request_id]
        for rid, err in errors:
            entry = self._streams.pop(rid, None)
            if entry is not None:
                entry[0].fail(err)

    def _fail_all(self, err: BaseException) -> None:
        for stream, _ in list(self._streams.values()):
            stream.fail(err)
        self._streams.clear()
        for done in self._resets.values():
            if not done.done():
                done.set_exception(err)
        self._resets.clear()

    def _reset_done(self, upto: int) -> None:
        """(event loop) The prefix-cache resets asked for up to the `upto`-th are done."""
        for number in [n for n in self._resets if n <= upto]:
            done = self._resets.pop(number)
            if not done.done():
                done.set_result(None)

    async def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left, let the engine thread report it and end, then free the engine."""
        self.abort(list(self._streams))
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within %.0f s", timeout)
        else:
            self.engine.close()

    # ---- the engine thread ----------------------------------------------------------------------------
    def sync(self, ops: list[tuple[str, Any]], last: bool = False) -> list[tuple[str, Any]]:
        """This step's inbox, as every rank must apply it: under tensor parallelism rank 0 (this runner)
        broadcasts it to the other ranks (`follow`), with `last` when the engine loop ends."""
        if self.distributed:
            broadcast_ops(ops, last)
        return ops

    def _take(self) -> tuple[list[tuple[str, Any]], bool]:
        busy = self.engine.has_unfinished_requests()
        with self._cond:
            if not busy and not self._inbox and not self._stopping:
                self._cond.wait(timeout=self.log_interval)
            ops = list(self._inbox)
            self._inbox.clear()
            return ops, self._stopping

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                ops, stopping = self._take()
                ops = self.sync(ops)
                errors, aborted = apply_ops(engine, ops)
                resets = [n for kind, n in ops if kind == "reset_prefix_cache"]
                if resets:
                    self._call(self._reset_done, max(resets))
                outs: list[StepOutput] = []
                if engine.has_unfinished_requests() or aborted:
                    outs = engine.step()  # (raising: an engine-wide fault; one request's failure is its output)
                finished = sum(o.finished for o in outs) + len(errors)
                if finished:  # counted free before the metrics say so: a client that saw them may submit
                    with self._count:
                        self.outstanding -= finished
                self._observe(outs)
                if outs or errors:
                    self._call(self._deliver, outs, errors)
                if stopping and not engine.has_unfinished_requests():
                    with self._cond:
                        if not self._inbox:
                            self.sync([], last=True)
                            return
        except BaseException as e:
            self.error = e
            log.exception("the engine failed; every running request fails with it and the server stops")
            self._call(self._fail_all, APIError(500, f"the engine failed: {e}", type="server_error",
                                                code="engine_error"))
            if self.on_fatal is not None:
                self.on_fatal(e)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _observe(self, outs: list[StepOutput]) -> None:
        engine, metrics = self.engine, self.metrics
        if metrics is not None:
            metrics.observe_engine(engine)
        for out in outs:
            if out.finished:
                if metrics is not None:
                    metrics.observe_finished(out)
                log_finished(out)
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            s = engine.stats
            prompt, gen = s.prompt_tokens - self._logged[0], s.generation_tokens - self._logged[1]
            if prompt or gen or engine.has_unfinished_requests():
                dt = now - self._last_log
                acc = s.spec
                spec = (f", speculation: {acc.acceptance_rate:.1%} of {acc.draft_tokens} drafts accepted, "
                        f"{acc.mean_accepted_tokens:.2f} tokens per round" if acc.rounds else "")
                log.info("throughput: prompt %.1f tokens/s, generation %.1f tokens/s; running %d, waiting %d, "
                         "KV cache %.1f%%, prefix-cache hits %.1f%%%s", prompt / dt, gen / dt, engine.num_running,
                         engine.num_waiting, 100 * engine.kv_cache_usage, 100 * engine.prefix_cache.hit_rate, spec)
            self._last_log, self._logged = now, (s.prompt_tokens, s.generation_tokens)


def apply_ops(engine: Engine, ops: list[tuple[str, Any]]) -> tuple[list[tuple[str, BaseException]], bool]:
    """Add and abort requests as the inbox says (the same on every rank); the adds that failed, and
    whether anything was aborted."""
    errors: list[tuple[str, BaseException]] = []
    aborted = False
    for kind, x in ops:
        if kind == "add":
            try:
                engine.add_request(x.prompt, x.params, x.spec, x.request_id, x.arrival, checked=True)
            except ValueError as e:  # checked by the handler already: a race (e.g. an id in use)
                errors.append((x.request_id, APIError(400, str(e))))
            except Exception as e:  # this request's own fault: it fails, the engine goes on
                log.exception("the engine could not add request %s", x.request_id)
                errors.append((x.request_id, request_error(str(e))))
        elif kind == "reset_prefix_cache":
            engine.reset_prefix_cache()
        else:
            engine.abort_request(x)
            aborted = True
    return errors, aborted


def broadcast_ops(ops: list[tuple[str, Any]] | None, last: bool = False) -> tuple[list[tuple[str, Any]], bool]:
    """Rank 0 sends (ops, last); every other rank receives them."""
    box: list[Any] = [(ops, last)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow(engine: Engine) -> None:
    """A tensor-parallel rank other than 0: apply rank 0's inbox each time it broadcasts one and step as it
    does, so every rank runs the same forwards (rank 0 also broadcasts an empty inbox every `log_interval`
    while idle); return when rank 0's engine loop ends."""
    while True:
        ops, last = broadcast_ops(None)
        if last:
            return
        _, aborted = apply_ops(engine, ops)
        if engine.has_unfinished_requests() or aborted:
            engine.step()


def request_error(message: str | None) -> APIError:
    """The answer to a request that the engine could not serve (a 500 for it alone)."""
    return APIError(500, f"the engine failed on this request: {message or 'see the server log'}",
                    type="server_error", code="engine_error")


def output_error(out: StepOutput) -> str | None:
    """A finished output's error message (finish_reason "error"), or None."""
    if out.finish_reason != "error":
        return None
    return out.error or "see the server log"


def log_finished(out: StepOutput) -> None:
    m, acc = out.metrics, out.spec
    ttft = f"{m.ttft:.3f} s" if m.ttft is not None else "-"
    e2e = f"{m.finished - m.arrival:.3f} s" if m.finished is not None else "-"
    spec = (f", acceptance {acc.acceptance_rate:.1%} ({acc.accepted_tokens}/{acc.draft_tokens} drafts, "
            f"{acc.mean_accepted_tokens:.2f} tokens per round)" if acc.rounds else "")
    error = output_error(out)
    (log.error if error else log.info)(
        "finished %s (%s%s): %d prompt tokens (%d cached), %d output tokens, TTFT %s, e2e %s%s", out.request_id,
        out.finish_reason, f": {error}" if error else "", len(out.prompt_token_ids), m.cached_tokens,
        len(out.token_ids), ttft, e2e, spec)
