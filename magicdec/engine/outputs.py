"""What the engine returns: a request's output per step (`StepOutput`, deltas; the whole output when final) with its
times (`RequestMetrics`), a generation's final outputs and run statistics (`GenerationResult`, `RunStats`); the
speculation counters of a request or a run (`Acceptance`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from magicdec.runtime.logprobs import TokenLogprob


@dataclass(slots=True)
class Acceptance:
    """Speculation counters: of one sequence, or summed over a run's sequences (`merge`).

    `rounds` counts verifications of one sequence (a round of a batch of B live sequences is B rounds);
    `accepted_at[i]` how many of them accepted the draft at position i, of `drafted_at[i]` drafted there."""

    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def record(self, gamma: int, accepted: int) -> None:
        """One verification of `gamma` drafts of which the first `accepted` were accepted."""
        self.rounds += 1
        self.draft_tokens += gamma
        self.accepted_tokens += accepted
        self._grow(gamma)
        for i in range(gamma):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < accepted

    def merge(self, other: Acceptance) -> None:
        self.rounds += other.rounds
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        self._grow(len(other.drafted_at))
        for i, (d, a) in enumerate(zip(other.drafted_at, other.accepted_at)):
            self.drafted_at[i] += d
            self.accepted_at[i] += a

    def _grow(self, n: int) -> None:
        while len(self.drafted_at) < n:
            self.drafted_at.append(0)
            self.accepted_at.append(0)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens; None when nothing was drafted (not 0: no draft was rejected either)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens committed per verification, the bonus token included (vLLM's mean acceptance length)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["drafted_at"], out["accepted_at"]
        return {**out, "acceptance_rate": self.acceptance_rate, "mean_accepted_tokens": self.mean_accepted_tokens}


@dataclass(slots=True)
class StepOutput:
    """What `Engine.step` returns for a request that advanced (vLLM's RequestOutput for one sequence, in deltas).

    Every output carries what is new since the request's previous one: `new_token_ids`, `new_text` (the
    text that no later token can turn into a stop string) and `num_tokens`, the output tokens so far. The
    whole output, `token_ids` and `text`, is filled in on the final output only (`finished`) and is empty
    on the others: a stream costs the size of its deltas, never the square of its length (a slow reader
    holding many outputs included). A consumer that wants the tokens so far adds up the deltas.
    `finish_reason`: "stop" (EOS or a stop string), "length", "abort", or "error": this request failed (its
    sampling, verification, stop rules or detokenization raised) and `error` says why; the engine goes on
    with the others."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]  # the delta of this step
    new_text: str
    num_tokens: int  # output tokens so far
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    spec: Acceptance
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)  # the whole output: on the final output only
    text: str = ""  # … and its text (cut before a stop string)
    error: str | None = None  # why the request failed, when finish_reason == "error"
    new_logprobs: list[TokenLogprob] | None = None  # the delta's tokens' (when its params ask for logprobs)
    logprobs: list[TokenLogprob] | None = None  # … the whole output's: on the final output only
    # the prompt's tokens' (the first None): on the first output with a token, and on the final one
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def to_dict(self, with_spec: bool = False) -> dict[str, Any]:
        """The output as JSON (a final output's whole tokens and text)."""
        out: dict[str, Any] = {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
                               "text": self.text, "finish_reason": self.finish_reason}
        if self.error is not None:
            out["error"] = self.error
        if with_spec:
            out["spec"] = self.spec.to_dict()
        return out


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


@dataclass(slots=True)
class RunStats:
    """Timings in seconds; throughput counts generated tokens of the whole batch over decode time."""

    batch: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # speculation
    method: str = "none"
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_prefill_s: float = 0.0
    acceptance: Acceptance = field(default_factory=Acceptance)  # the sequences' counters, summed
    gamma_history: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def seconds_per_token(self) -> float:
        return self.decode_s / self.generated_tokens if self.generated_tokens else float("inf")

    @property
    def acceptance_rate(self) -> float | None:
        """None when no round drafted (e.g. gamma="auto" found plain steps faster throughout)."""
        return self.acceptance.acceptance_rate

    @property
    def mean_accepted_tokens(self) -> float:
        return self.acceptance.mean_accepted_tokens

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "tokens_per_s": self.tokens_per_s,
            "method": self.method,
        }
        if self.method != "none":
            a = self.acceptance
            out.update(
                draft_s=self.draft_s,
                verify_s=self.verify_s,
                other_s=max(self.decode_s - self.draft_s - self.verify_s, 0.0),
                draft_prefill_s=self.draft_prefill_s,
                rounds=a.rounds,
                draft_tokens=a.draft_tokens,
                accepted_tokens=a.accepted_tokens,
                acceptance_rate=a.acceptance_rate,
                mean_accepted_tokens=a.mean_accepted_tokens,
                per_position_acceptance=a.per_position_acceptance,
                gamma_history=self.gamma_history,
            )
        out.update(self.extra)
        return out


@dataclass(slots=True)
class GenerationResult:
    outputs: list[StepOutput]  # the final output of each prompt, in the prompts' order
    stats: RunStats

    def to_dict(self) -> dict[str, Any]:
        stats = self.stats.to_dict()
        if self.stats.method != "none":
            stats["per_sequence"] = [o.spec.to_dict() for o in self.outputs]
        return {"outputs": [o.to_dict() for o in self.outputs], "stats": stats}
