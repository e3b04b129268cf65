"""What a generation returns: per-sequence outputs and the run's statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class SequenceStats:
    """Speculation counters of one sequence."""

    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens committed per verification, the bonus token included (vLLM's mean acceptance length)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "mean_accepted_tokens": self.mean_accepted_tokens}


@dataclass(slots=True)
class RequestOutput:
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    spec: SequenceStats = field(default_factory=SequenceStats)

    def to_dict(self, with_spec: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }
        if with_spec:
            out["spec"] = self.spec.to_dict()
        return out


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
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    committed_tokens: int = 0  # tokens committed by verifications (bonus included), before truncation
    # while every sequence of the batch is still generating (no tail of a shrinking batch)
    steady_s: float = 0.0
    steady_tokens: int = 0
    per_position_accepted: list[int] = field(default_factory=list)
    per_position_drafted: list[int] = field(default_factory=list)
    gamma_history: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def seconds_per_token(self) -> float:
        return self.decode_s / self.generated_tokens if self.generated_tokens else float("inf")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.committed_tokens / self.rounds if self.rounds else 0.0

    @property
    def steady_tokens_per_s(self) -> float:
        """Throughput while the whole batch was generating: the rate a server keeping its batch full sees."""
        return self.steady_tokens / self.steady_s if self.steady_s else 0.0

    def record_round(self, gamma: int, accepted: list[int]) -> None:
        n = len(accepted)
        self.rounds += n
        self.draft_tokens += gamma * n
        self.accepted_tokens += sum(accepted)
        self.committed_tokens += sum(accepted) + n
        while len(self.per_position_drafted) < gamma:
            self.per_position_drafted.append(0)
            self.per_position_accepted.append(0)
        for i in range(gamma):
            self.per_position_drafted[i] += n
            self.per_position_accepted[i] += sum(a > i for a in accepted)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "tokens_per_s": self.tokens_per_s,
            "steady_tokens_per_s": self.steady_tokens_per_s,
            "method": self.method,
        }
        if self.method != "none":
            out.update(
                draft_s=self.draft_s,
                verify_s=self.verify_s,
                other_s=max(self.decode_s - self.draft_s - self.verify_s, 0.0),
                draft_prefill_s=self.draft_prefill_s,
                rounds=self.rounds,
                draft_tokens=self.draft_tokens,
                accepted_tokens=self.accepted_tokens,
                acceptance_rate=self.acceptance_rate,
                mean_accepted_tokens=self.mean_accepted_tokens,
                per_position_acceptance=[
                    a / d if d else 0.0 for a, d in zip(self.per_position_accepted, self.per_position_drafted)
                ],
                gamma_history=self.gamma_history,
            )
        out.update(self.extra)
        return out


@dataclass(slots=True)
class GenerationResult:
    outputs: list[RequestOutput]
    stats: RunStats
    baseline: RunStats | None = None  # plain decoding of the same batch, with --compare

    def to_dict(self) -> dict[str, Any]:
        spec = self.stats.method != "none"
        stats = self.stats.to_dict()
        stats["per_sequence"] = [o.spec.to_dict() for o in self.outputs] if spec else None
        if self.baseline is not None:
            stats["baseline"] = self.baseline.to_dict()
            stats["speedup"] = self.speedup
            stats["steady_speedup"] = self.steady_speedup
        if stats["per_sequence"] is None:
            del stats["per_sequence"]
        return {"outputs": [o.to_dict() for o in self.outputs], "stats": stats}

    @property
    def steady_speedup(self) -> float | None:
        """The same ratio over the rounds in which every sequence was still generating."""
        if self.baseline is None or not self.baseline.steady_tokens_per_s:
            return None
        return self.stats.steady_tokens_per_s / self.baseline.steady_tokens_per_s

    @property
    def speedup(self) -> float | None:
        """Plain seconds per token over this run's seconds per token (prefill excluded)."""
        if self.baseline is None:
            return None
        return self.baseline.seconds_per_token / self.stats.seconds_per_token
