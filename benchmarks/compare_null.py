"""The `--compare` method against itself: plain decoding on both sides must report 1.00× within noise.

`magicdec generate --compare` (and so `make demo`) prints the speedup of `magicdec.bench.compare.compare`: both
sides in one core from the same warm prefix cache, runs alternating. Run with speculation off on both sides,
whatever it prints beyond 1.00× is the method's bias (the static-path comparison it replaced printed 1.13× at
the demo's settings). With `--spec`, the same prompts are then compared against that speculative setting, so
the null and the real figure come from one run of one process.

    .venv/bin/python benchmarks/compare_null.py --batch 8 --context 4096 --max-new-tokens 128 --repeats 3 \\
        --spec self:streaming:256:2:int8
"""

from __future__ import annotations

import argparse
import json
import sys

from magicdec import LLM, SamplingParams, SpecConfig
from magicdec.bench.compare import compare
from magicdec.bench.corpora import load_corpus, make_prompts


def parse_spec(text: str) -> SpecConfig:
    """method:drafter:budget:gamma:weights, e.g. self:streaming:256:2:int8."""
    method, drafter, budget, gamma, weights = text.split(":")
    return SpecConfig(method=method, drafter=drafter, budget=int(budget), sinks=16,
                      gamma=gamma if gamma == "auto" else int(gamma), draft_weights=weights)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec", action="append", default=[], help="also compare this setting (repeatable)")
    args = p.parse_args()
    llm = LLM()
    prompts = make_prompts(llm.tokenizer, load_corpus("austen"), lengths=[args.context] * args.batch, seed=args.seed)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    settings: list[SpecConfig | None] = [None, *map(parse_spec, args.spec)]
    for spec in settings:
        r = compare(llm, prompts, params, spec, repeats=args.repeats)
        steady = "—" if r.steady_speedup is None else f"{r.steady_speedup:.3f}×"
        label = "plain vs plain" if spec is None else spec.label
        print(json.dumps({"setting": label, "batch": args.batch, "context": args.context,
                          "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "speedup": r.speedup,
                          "steady_speedup": r.steady_speedup, "matches_plain": r.matches_plain,
                          "acceptance": r.result.stats.acceptance_rate,
                          "decode_s_runs": [x.stats.decode_s for x in r.runs],
                          "decode_s_baselines": [x.stats.decode_s for x in r.baselines]}))
        print(f"{label}: {r.speedup:.3f}× (steady {steady}), identical outputs: {r.matches_plain}", file=sys.stderr,
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
