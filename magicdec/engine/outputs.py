"""What a generation returns: each request's final output (`StepOutput`, with its acceptance counts) and the
run's statistics; the speculation counters of a request or a run (`Acceptance`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magicdec.engine.request import StepOutput


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
