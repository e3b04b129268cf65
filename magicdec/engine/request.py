"""One request of the serving engine: its tokens, where it stands, the blocks it holds, and its stream.

A request's tokens are its prompt then its output. `computed` of them have their keys and values in the
paged cache; once its prompt is in, the last output token is the pending one (not yet in the cache), so
while it decodes `computed == len(tokens) - 1`. A request is WAITING (not admitted, or preempted: it
holds no blocks and recomputes what it had), PREFILLING (admitted: its prompt, or after a preemption its
prompt and output, go into the cache chunk by chunk), DECODING, or FINISHED.

Text is detokenized incrementally (never a broken UTF-8 character: a token that ends inside one waits
for the next), searched for stop strings as it grows (`TextStream`), and streamed without ever emitting
part of a stop string that the next tokens may complete. A step's outputs are deltas (`StepOutput`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from magicdec.engine.outputs import Acceptance, RequestMetrics, StepOutput
from magicdec.loading.tokenizer import Tokenizer
from magicdec.runtime.grammar import GrammarState
from magicdec.runtime.logprobs import TokenLogprob
from magicdec.runtime.penalties import TokenHistory
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.hybrid import SourceAcceptance
from magicdec.spec.lookup import Draft, Proposer


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


REQUEST_METHODS = ("none", "self", "ngram", "suffix", "hybrid")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """A request's own speculation setting. `gamma`: None = the engine's; 0 = off; k = always γ = k (for a
    model-free draft: proposals of at most k tokens). `method`: None = the engine's; "none" = off; "self" = the
    engine's model draft only; "ngram" / "suffix" = model-free proposals only (any engine); "hybrid" = each
    round the better of a model-free proposal and the engine's model draft."""

    gamma: int | None = None
    method: str | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in REQUEST_METHODS:
            raise ValueError(f"a request's speculation method must be one of {REQUEST_METHODS} (or None: the "
                             f"engine's), got {self.method!r}")




class TextStream:
    """A request's output text: detokenized incrementally (never ending inside a UTF-8 character: a token
    that ends inside one waits for the next) and searched for stop strings as it grows. Each token's search
    covers only the text it completed and the `keep` = max(len(stop)) - 1 characters before it, so a token
    costs the same whatever the output's length, and a stop string of characters that take several tokens
    each (emoji) is found once its last character is whole. The text is handed out (`take`) as far as no
    later token can turn it into a stop string; it ends where the first stop string starts (`end`)."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], include_stop: bool = False,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.include_stop, self.skip_special = include_stop, skip_special_tokens
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # ids[prefix:read]: the tokens decoded last (their text is known)
        self.pieces: list[str] = []
        self.chars = 0  # characters decoded so far
        self.keep = max((len(s) for s in stop), default=1) - 1
        self.tail = ""  # the last `keep` characters
        self.end: int | None = None  # where the first stop string starts: the text ends there
        self.given = 0  # characters handed out by `take`
        self.pending = ""  # decoded characters not handed out yet

    def add(self, token: int, search: bool = True) -> bool:
        """Decode one more token; True if the text now holds a stop string (searched for only when `search`:
        not before min_tokens). With `include_stop` the text ends after the stop string, not before it."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip_special)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip_special)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        new = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        if self.stop and self.end is None:
            window = self.tail + new
            hits = [(i, len(s)) for i, s in ((window.find(s), s) for s in self.stop) if i >= 0] if search else []
            if hits:
                i, n = min(hits)
                self.end = self.chars - len(self.tail) + i + (n if self.include_stop else 0)
            self.tail = window[-self.keep :] if self.keep else ""
        self.pieces.append(new)
        self.pending += new
        self.chars += len(new)
        return self.end is not None

    def take(self, final: bool) -> str:
        """The text not handed out yet, up to the stop string; before the end, less the last `keep` characters
        (the start of a stop string the next tokens may complete)."""
        limit = self.end if self.end is not None else self.chars if final or not self.stop else self.chars - self.keep
        n = limit - self.given
        if n <= 0:
            return ""
        out, self.pending = self.pending[:n], self.pending[n:]
        self.given += n
        return out

    def text(self) -> str:
        """The whole text, cut before the first stop string."""
        return "".join(self.pieces)[: self.end]


class Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, eos: set[int],
                 tokenizer: Tokenizer, generator: torch.Generator | None, spec: RequestSpec | None = None,
                 arrival: float | None = None, random_kv: bool = False) -> None:
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.eos = (set() if params.ignore_eos else set(eos)) | set(params.stop_token_ids)  # tokens that stop it
        self.generator, self.spec = generator, spec or RequestSpec()
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None  # why it failed (finish_reason "error")
        self.status = Status.WAITING
        self.blocks: list[int] = []
        self.kept: list[int] = []  # private blocks of its draft's selection (SnapKV), beside `blocks`
        self.rings: list[list[int]] = []  # per sliding group, the blocks its columns cycle through (`Scheduler`)
        self.kept_slots = 0  # … of which slots hold a selected position (per layer and KV head)
        self.computed = 0  # tokens with KV in the cache
        self.registered = 0  # leading tokens whose blocks were offered to the prefix cache
        self.draft_seen = 0  # a draft with KV of its own has it for positions < draft_seen
        self.scores: torch.Tensor | None = None  # a guided draft's block scores from its last verification
        self.random_kv = random_kv  # its prompt's KV is random (systems benchmarks): no prefill forward
        self.proposer: Proposer | None = None  # its model-free drafts' index over its committed tokens
        self.indexed = 0  # … of how many of its tokens
        self.sources = SourceAcceptance()  # its acceptance per draft source (the hybrid's choice learns it)
        self.draft = Draft()  # what it drafts this round (set by the engine's draft choice)
        self.hashes: list[bytes] | None = None  # the prompt's full blocks' hash chain (prefix caching), made once
        self.admitted = False  # admitted once: its prefix-cache lookup counted and its cached_tokens set
        self.acceptance = Acceptance()
        self.metrics = RequestMetrics(time.monotonic() if arrival is None else arrival)
        self.text = TextStream(tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens)
        self.streamed_tokens = 0
        self.history: TokenHistory | None = None  # its token counts, when penalties or bias adjust its logits
        self.grammar: GrammarState | None = None  # its structured output's matcher (through its committed tokens)
        self.logprobs: list[TokenLogprob] = []  # its output tokens' (when params.logprobs is not None)
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # its prompt tokens' (the first: None)
        self.prompt_logprobs_sent = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def held(self) -> list[int]:
        """Every block it holds: its own, its kept ones, its rings'."""
        return self.blocks + self.kept + [b for ring in self.rings for b in ring]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] (prompt then output), without building the whole list."""
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        return self.prompt[start:n] + self.output[max(start - n, 0) : end - n]

    def index(self, upto: int) -> None:
        """Tell its model-free proposer its tokens up to `upto` (prompt chunks as they are computed, committed
        output tokens as they come; never a token twice: a recomputed chunk adds nothing)."""
        if self.proposer is not None and upto > self.indexed:
            self.proposer.append(self.token_slice(self.indexed, upto))
            self.indexed = upto

    @property
    def target_computed(self) -> int:
        """How many tokens the cache holds once prefill is done: the prompt, and after a preemption the
        output but its last (pending) token."""
        return len(self.prompt) if not self.output else len(self.prompt) + len(self.output) - 1

    @property
    def to_compute(self) -> int:
        """Tokens still to put in the cache before decoding (0 while decoding)."""
        return max(self.target_computed - self.computed, 0)

    @property
    def context(self) -> int:
        return self.computed

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output)

    def append(self, tokens: list[int], now: float, logprobs: list[TokenLogprob] | None = None) -> None:
        """Commit new output tokens (and their log-probabilities) through the stop rules (EOS and stop token
        ids, stop strings — neither before min_tokens — and max_new_tokens)."""
        added, reason = 0, None
        for token in tokens:
            self.output.append(token)
            added += 1
            armed = len(self.output) >= self.params.min_tokens  # (EOS before then is masked in the logits)
            if self.grammar is not None:
                self.grammar.commit([token])
            # stop strings as vLLM searches them: only in text that tokens past the first min_tokens complete
            # (one that began earlier counts: the text ends where it starts)
            if self.text.add(token, len(self.output) > self.params.min_tokens) or (armed and token in self.eos):
                reason = "stop"
            elif self.grammar is not None and self.grammar.finished:  # nothing more may follow (even ignoring EOS)
                reason = "stop"
            elif len(self.output) >= self.params.max_new_tokens:
                reason = "length"
            if reason:
                break
        if self.history is not None:
            self.history.add(tokens[:added])
        if logprobs is not None:
            self.logprobs += logprobs[:added]
        if added and self.metrics.first_token is None:
            self.metrics.first_token = now
        self.metrics.token_times.extend([now] * added)
        if reason:
            self.finish(reason, now)

    def finish(self, reason: str, now: float, error: str | None = None) -> None:
        self.finish_reason, self.status, self.error = reason, Status.FINISHED, error
        self.metrics.finished = now

    def final_text(self) -> str:
        return self.text.text()

    def delta(self) -> StepOutput:
        """The output since the last delta (text: all that no later token can still turn into a stop string);
        the final one also carries the whole output."""
        new_tokens = self.output[self.streamed_tokens :]
        self.streamed_tokens = len(self.output)
        new_text = self.text.take(self.finished)
        start = len(self.output) - len(new_tokens)
        out = StepOutput(self.request_id, self.prompt, new_tokens, new_text, len(self.output), self.finished,
                         self.finish_reason, self.acceptance, self.metrics, error=self.error)
        if self.params.logprobs is not None:
            out.new_logprobs = self.logprobs[start:]
        if self.prompt_logprobs is not None and (self.output or self.finished) and not self.prompt_logprobs_sent:
            out.prompt_logprobs, self.prompt_logprobs_sent = self.prompt_logprobs, True
        if self.finished:
            out.token_ids, out.text = list(self.output), self.final_text()
            if self.params.logprobs is not None:
                out.logprobs = list(self.logprobs)
            out.prompt_logprobs = self.prompt_logprobs
        return out
