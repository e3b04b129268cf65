"""Speculative against plain decoding of the same prompts (`magicdec generate --compare`, through the serving
engine's core as `LLM.generate` runs it), and the steady-state clock that the benchmark grid reads from the
static batch's round reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from magicdec.costmodel.policy import GammaPolicy
from magicdec.engine.batch import Batch
from magicdec.engine.outputs import GenerationResult
from magicdec.engine.step import RoundReport
from magicdec.llm import LLM, Prompt
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import SpecConfig, paged_problem
from magicdec.spec.verify import Verifier


class SteadyClock:
    """Time and tokens of the rounds in which every sequence of the batch was still generating: the
    rate a server that keeps its batch full would see (no tail of sequences finishing one by one)."""

    def __init__(self, rows: int) -> None:
        self.rows, self.seconds, self.tokens = rows, 0.0, 0

    def __call__(self, report: RoundReport) -> None:
        if report.live == self.rows:
            self.seconds += report.seconds - report.capture_s
            self.tokens += report.new_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def decode_timed(llm: LLM, batch: Batch, spec: SpecConfig | None = None, verifier: Verifier | None = None,
                 progress: bool = False, gamma_policy: GammaPolicy | None = None,
                 resident: dict[str, int] | None = None) -> GenerationResult:
    """`llm.decode`, with the steady-state throughput in the stats (`steady_tokens_per_s`)."""
    assert batch.state is not None
    steady = SteadyClock(len(batch.state.live()))  # rows that finished at their first token never take part
    result = llm.decode(batch, spec, gamma_policy=gamma_policy, verifier=verifier, on_round=steady,
                        progress=progress, resident=resident)
    result.stats.extra["steady_tokens_per_s"] = steady.tokens_per_s
    return result


@dataclass(slots=True)
class Comparison:
    """A speculative run and plain decoding of the same prompts (prefill excluded from both)."""

    result: GenerationResult
    baseline: GenerationResult
    greedy: bool  # only greedy outputs must be equal token for token

    @property
    def speedup(self) -> float:
        """Plain seconds per token over speculative seconds per token."""
        return self.baseline.stats.seconds_per_token / self.result.stats.seconds_per_token

    @property
    def steady_speedup(self) -> float | None:
        ours, plain = (r.stats.extra.get("steady_tokens_per_s") for r in (self.result, self.baseline))
        return ours / plain if ours and plain else None

    @property
    def matches_plain(self) -> bool:
        return [o.token_ids for o in self.result.outputs] == [o.token_ids for o in self.baseline.outputs]

    def to_dict(self) -> dict[str, Any]:
        out = self.result.to_dict()
        out["stats"].update(baseline=self.baseline.stats.to_dict(), speedup=self.speedup,
                            steady_speedup=self.steady_speedup)
        if self.greedy:
            out["stats"]["matches_plain"] = self.matches_plain
        return out


def compare(llm: LLM, prompts: Sequence[Prompt], params: SamplingParams, spec: SpecConfig,
            progress: bool = False) -> Comparison:
    """Plain decoding, then speculative decoding of the same prompts in one engine (`LLM.generate`'s code
    path): the second run finds the prompts in the prefix cache (it recomputes only each prompt's last
    chunk); decode times exclude prefill in both."""
    if not spec.enabled:
        raise ValueError("a comparison needs speculation: method 'self' or 'draft' (--spec self|draft)")
    if paged_problem(spec) is not None:  # what only the static batch runs: prefill once, decode a copy and it
        batch = llm.prefill(prompts, params, max_gamma=spec.gamma_bound, progress=progress)
        held = {"target KV cache": batch.cache.nbytes}
        copy = batch.fork(plan=llm.memory_plan(held), budget=llm.memory_budget)
        result = decode_timed(llm, copy, spec, progress=progress, resident={"original of the KV cache": held[
            "target KV cache"]})
        return Comparison(result, decode_timed(llm, batch, progress=progress), params.greedy)
    ids = llm.encode(prompts)
    llm.check_context(ids, params)
    core = llm.core_for(ids, params, spec, runs=2)
    plain = SpecConfig()
    llm.speculate(core, None)
    baseline = llm.run_core(core, ids, params, plain, progress=progress)
    llm.speculate(core, spec)
    result = llm.run_core(core, ids, params, spec, progress=progress)
    return Comparison(result, baseline, params.greedy)
