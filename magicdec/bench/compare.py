"""Speculative against plain decoding of the same prompts, like for like (`magicdec generate --compare`).

Both sides run in one engine core (the path `LLM.generate` and `magicdec serve` run) under the same conditions:
first a warm-up puts every prompt's whole prefill chunks in the prefix cache (one run of a single token each,
speculation on: a draft with a KV pool of its own holds them too), then plain and speculative runs alternate —
`repeats` of each, the order flipped every repeat (plain, spec, spec, plain, …) so that neither side always runs
first while the machine's speed drifts — each admitting every prompt at once and served from the same warm cache
(each recomputes only its prompt's last partial chunk). Decode time excludes those prefill chunks on both sides. The
speedup is the median, over the repeats, of plain decode time per token over the speculative one of the same repeat
(the two runs adjacent in time, so a machine whose speed drifts between repeats moves both sides of a ratio alike);
the whole run, its tail of requests finishing one by one included, and the same for the steady state: the steps in
which every request decoded and none prefilled. With speculation off on both sides the method reports 1.00× within
noise (`benchmarks/compare_null.py` measures it). """

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from magicdec.engine.outputs import GenerationResult
from magicdec.llm import LLM, Prompt
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import SpecConfig


def _median_run(runs: list[GenerationResult]) -> GenerationResult:
    return sorted(runs, key=lambda r: r.stats.decode_s)[len(runs) // 2]


def _steady(r: GenerationResult) -> float:
    return r.stats.extra.get("steady_tokens_per_s") or 0.0


@dataclass(slots=True)
class Comparison:
    """Speculative and plain runs of the same prompts from the same warm prefix cache (prefill excluded)."""

    runs: list[GenerationResult]  # the speculative runs
    baselines: list[GenerationResult]  # the plain runs
    greedy: bool  # only greedy outputs must be equal token for token
    spec: SpecConfig = field(default_factory=SpecConfig)

    @property
    def result(self) -> GenerationResult:
        """The speculative run of median decode time."""
        return _median_run(self.runs)

    @property
    def baseline(self) -> GenerationResult:
        return _median_run(self.baselines)

    @property
    def speedup(self) -> float:
        """Plain seconds per token over speculative seconds per token: the median of the repeats' ratios."""
        return statistics.median(b.stats.seconds_per_token / r.stats.seconds_per_token
                                 for b, r in zip(self.baselines, self.runs))

    @property
    def steady_speedup(self) -> float | None:
        """The same in the steady state (every request decoding, none prefilling); None if no step was."""
        ratios = [_steady(r) / _steady(b) for b, r in zip(self.baselines, self.runs) if _steady(r) and _steady(b)]
        return statistics.median(ratios) if len(ratios) == len(self.runs) else None

    @property
    def matches_plain(self) -> bool:
        want = [o.token_ids for o in self.baselines[0].outputs]
        return all([o.token_ids for o in r.outputs] == want for r in self.runs + self.baselines)

    def to_dict(self) -> dict[str, Any]:
        out = self.result.to_dict()
        out["stats"].update(baseline=self.baseline.stats.to_dict(), speedup=self.speedup,
                            steady_speedup=self.steady_speedup, repeats=len(self.runs),
                            decode_s_runs=[r.stats.decode_s for r in self.runs],
                            decode_s_baselines=[r.stats.decode_s for r in self.baselines])
        if self.greedy:
            out["stats"]["matches_plain"] = self.matches_plain
        return out


def compare(llm: LLM, prompts: Sequence[Prompt], params: SamplingParams, spec: SpecConfig | None,
            repeats: int = 2, progress: bool = False) -> Comparison:
    """`repeats` plain and `repeats` speculative runs of `prompts`, alternating, in one engine core from the same
    warm prefix cache (see the module docstring). `spec` None (or method "none") compares plain with plain:
    the method's own bias, which should be 1.00× within noise."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    spec = spec if spec is not None and spec.enabled else None
    ids = llm.encode(prompts)
    llm.check_context(ids, params)
    core = llm.core_for(ids, params, spec, runs=2)
    try:
        core.set_speculation(spec)  # warm-up: every prompt's whole chunks into the prefix cache (and a draft's)
        llm.run(core, ids, replace(params, max_new_tokens=1, stop=()))
        runs: list[GenerationResult] = []
        baselines: list[GenerationResult] = []
        for i in range(repeats):
            sides = [(None, baselines), (spec, runs)]
            for s, into in sides if i % 2 == 0 else sides[::-1]:
                core.set_speculation(s)
                core.forget_outputs()  # suffix drafts must not replay the last run's outputs
                into.append(llm.run(core, ids, params, progress=progress))
    finally:
        core.close()
    return Comparison(runs, baselines, params.greedy, spec or SpecConfig())
