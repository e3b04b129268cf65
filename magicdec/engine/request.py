"""One request of the serving engine: its tokens, where it stands, the blocks it holds, and its stream.

A request's tokens are its prompt then its output. `computed` of them have their keys and values in the
paged cache; once its prompt is in, the last output token is the pending one (not yet in the cache), so
while it decodes `computed == len(tokens) - 1`. A request is WAITING (not admitted, or preempted: it
holds no blocks and recomputes what it had), PREFILLING (admitted: its prompt, or after a preemption its
prompt and output, go into the cache chunk by chunk), DECODING, or FINISHED.

Text is detokenized incrementally (never a broken UTF-8 character: a token that ends inside one waits
for the next) and streamed without ever emitting part of a stop string that the next tokens may complete.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from magicdec.engine.outputs import Acceptance, RequestOutput
from magicdec.engine.state import Stopper
from magicdec.loading.tokenizer import Tokenizer
from magicdec.runtime.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """A request's own speculation setting: None = the engine's; 0 = off; k = always γ = k."""

    gamma: int | None = None


@dataclass(slots=True)
class StepOutput:
    """What `Engine.step` returns for a request that advanced (vLLM's RequestOutput for one sequence)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    text: str  # the output text so far (as streamed: a possible stop string's start held back)
    new_token_ids: list[int]  # the delta of this step
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    spec: Acceptance
    metrics: RequestMetrics


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.monotonic) of the request's life."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was produced (per step)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


class Detokenizer:
    """Incremental detokenization: text for new tokens, never ending inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0
        self.text = ""

    def add(self, new: list[int]) -> None:
        self.ids.extend(new)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)


class Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, stopper: Stopper,
                 tokenizer: Tokenizer, generator: torch.Generator | None, spec: RequestSpec | None = None,
                 arrival: float | None = None) -> None:
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.stopper, self.generator, self.spec = stopper, generator, spec or RequestSpec()
        self.record = RequestOutput(0, prompt)  # the output tokens, through the stop rules
        self.output = self.record.token_ids
        self.finish_reason: str | None = None
        self.status = Status.WAITING
        self.blocks: list[int] = []
        self.kept: list[int] = []  # private blocks of its draft's selection (SnapKV), beside `blocks`
        self.kept_slots = 0  # … of which slots hold a selected position (per layer and KV head)
        self.computed = 0  # tokens with KV in the cache
        self.registered = 0  # leading tokens whose blocks were offered to the prefix cache
        self.draft_seen = 0  # a draft with KV of its own has it for positions < draft_seen
        self.hashes: list[bytes] | None = None  # the prompt's full blocks' hash chain (prefix caching), made once
        self.acceptance = Acceptance()
        self.metrics = RequestMetrics(time.monotonic() if arrival is None else arrival)
        self.detok = Detokenizer(tokenizer)
        self.streamed_tokens, self.streamed_chars = 0, 0
        self.holdback = max((len(s) for s in params.stop), default=1) - 1

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def to_compute(self) -> int:
        """Tokens still to put in the cache before decoding (0 while decoding): the prompt, and after a
        preemption the output but its last (pending) token."""
        target = len(self.prompt) if not self.output else len(self.prompt) + len(self.output) - 1
        return max(target - self.computed, 0)

    @property
    def context(self) -> int:
        return self.computed

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output)

    def append(self, tokens: list[int], now: float) -> None:
        """Commit new output tokens through the stop rules (EOS, stop strings, max_new_tokens)."""
        before = len(self.output)
        self.stopper.extend(self.record, tokens)
        added = len(self.output) - before
        if added and self.metrics.first_token is None:
            self.metrics.first_token = now
        self.metrics.token_times.extend([now] * added)
        self.detok.add(self.output[before:])
        if self.record.finish_reason is not None:
            self.finish(self.record.finish_reason, now)

    def finish(self, reason: str, now: float) -> None:
        self.finish_reason, self.status = reason, Status.FINISHED
        self.metrics.finished = now

    def final_text(self) -> str:
        text = self.stopper.tokenizer.decode(self.output)
        if self.params.stop and self.finish_reason == "stop":
            cut = [text.find(s) for s in self.params.stop if s in text]
            if cut:
                text = text[: min(cut)]
        return text

    def delta(self) -> StepOutput:
        """The output since the last delta (text: all that no later token can still turn into a stop string)."""
        if self.finished:
            text = self.final_text()
        else:
            text = self.detok.text
            if self.params.stop:
                text = text[: max(len(text) - self.holdback, self.streamed_chars)]
        new_tokens = self.output[self.streamed_tokens :]
        new_text = text[self.streamed_chars :]
        self.streamed_tokens, self.streamed_chars = len(self.output), max(len(text), self.streamed_chars)
        return StepOutput(self.request_id, self.prompt, list(self.output), text, new_tokens, new_text, self.finished,
                          self.finish_reason, self.acceptance, self.metrics)
