"""Model-free drafts against plain decoding and the sparse self-draft, on the workloads they are for.

For each workload (`magicdec.bench.workloads`: qa, revise, summary, chat — copy-heavy — and continuation, the
control), batch and context: one engine core, every prompt admitted at once from the same warm prefix cache
(a plain run of one token each first), then `repeats` rounds in which plain decoding and every drafter run
once each, the order rotated every round; greedy, the outputs of every configuration checked equal to plain
decoding's. Reported per configuration: the speedup (the median over rounds of plain's seconds per token
over its own in the same round, the whole run and the steady state), acceptance and mean accepted length,
and the measured matching seconds per request and round. Prompts come from the held-out split ("eval": the
second half of each book), never the one the proposers' defaults were tuned on.

    .venv/bin/python benchmarks/lookup_speed.py --workloads qa,chat,continuation --batches 1,8 --contexts 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from magicdec import LLM, SamplingParams, SpecConfig
from magicdec.bench.corpora import load_corpus
from magicdec.bench.workloads import WORKLOADS, build_workload
from magicdec.engine.outputs import GenerationResult
from magicdec.spec.config import Auto

CONFIGS = {
    "ngram": SpecConfig(method="self", drafter="ngram", gamma=8),
    "suffix": SpecConfig(method="self", drafter="suffix", gamma=8),
    "self": SpecConfig(method="self", drafter="streaming", budget=256, sinks=16, gamma=2, draft_weights="int8"),
    "hybrid": SpecConfig(method="self", drafter="hybrid", budget=256, sinks=16, gamma=Auto(max_gamma=8),
                         draft_weights="int8"),
}


def per_token(runs: list[GenerationResult]) -> float:
    return statistics.median(r.stats.seconds_per_token for r in runs)


def paired(plain: list[GenerationResult], runs: list[GenerationResult]) -> float:
    """The median over rounds of plain's seconds per token over this configuration's in the same round."""
    return statistics.median(p.stats.seconds_per_token / r.stats.seconds_per_token for p, r in zip(plain, runs))


def paired_steady(plain: list[GenerationResult], runs: list[GenerationResult]) -> float | None:
    rates = [(r.stats.extra.get("steady_tokens_per_s"), p.stats.extra.get("steady_tokens_per_s"))
             for p, r in zip(plain, runs)]
    return statistics.median(a / b for a, b in rates) if all(a and b for a, b in rates) else None


def point(llm: LLM, workload: str, batch: int, context: int, names: list[str], args: argparse.Namespace,
          corpus: object) -> list[dict]:
    prompts = build_workload(workload, llm.tokenizer, corpus, context, batch, seed=args.seed, split=args.split)
    ids = [p.tokens for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    specs = {n: CONFIGS[n] for n in names}
    widest = max(specs.values(), key=lambda s: (s.model_side is not None, s.gamma_bound))
    core = llm.core_for(ids, params, widest, runs=2)
    runs: dict[str, list[GenerationResult]] = {"plain": [], **{n: [] for n in names}}
    order = ["plain", *names]
    try:
        # every prompt's whole chunks into the prefix cache, with the model draft on (its own KV pool too), so
        # every configuration starts warm
        core.set_speculation(widest)
        llm.run(core, ids, SamplingParams(max_new_tokens=1))
        for rnd in range(args.repeats):
            shift = rnd % len(order)
            for name in order[shift:] + order[:shift]:
                core.set_speculation(None if name == "plain" else specs[name])
                core.forget_outputs()  # suffix drafts propose from recent outputs: never this prompt's last run
                runs[name].append(llm.run(core, ids, params))
    finally:
        core.close()
    want = [o.token_ids for o in runs["plain"][0].outputs]
    out = []
    for name in order:
        rs = runs[name]
        a = rs[0].stats.acceptance
        out.append({"workload": workload, "batch": batch, "context": context, "config": name,
                    "label": "plain" if name == "plain" else specs[name].label,
                    "speedup": paired(runs["plain"], rs),
                    "steady_speedup": paired_steady(runs["plain"], rs),
                    "tokens_per_s": 1 / per_token(rs), "acceptance_rate": a.acceptance_rate,
                    "mean_accepted_tokens": a.mean_accepted_tokens if a.rounds else None,
                    "generated_tokens": rs[0].stats.generated_tokens,
                    "match_s_per_request": rs[0].stats.extra.get("match_s_per_request"),
                    "decode_s": [r.stats.decode_s for r in rs],
                    "matches_plain": all([o.token_ids for o in r.outputs] == want for r in rs)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)} (plain always runs)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--contexts", default="4096")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("eval", "tune"), default="eval",
                   help="passages: held out (eval, reported) or the tuning half (tune, to try changes on)")
    p.add_argument("--out", type=Path, help="append the records (JSON lines) to this file")
    args = p.parse_args()
    names = [n for n in args.configs.split(",") if n]
    bad = [n for n in names if n not in CONFIGS] + [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if bad:
        print(f"unknown configuration or workload: {', '.join(bad)}", file=sys.stderr)
        return 2
    llm = LLM()
    corpus = load_corpus("austen")
    print("| workload | batch | context | config | speedup | steady | accept | mean acc. len | matches plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                t0 = time.time()
                records = point(llm, workload, batch, context, names, args, corpus)
                for r in records:
                    acc = "—" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
                    mal = "—" if r["mean_accepted_tokens"] is None else f"{r['mean_accepted_tokens']:.2f}"
                    st = "—" if r["steady_speedup"] is None else f"{r['steady_speedup']:.2f}×"
                    print(f"| {workload} | {batch} | {context} | {r['label']} | {r['speedup']:.2f}× | {st} | {acc} | "
                          f"{mal} | {r['matches_plain']} |", flush=True)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(json.dumps(r) + "\n")
                print(f"<!-- {workload} b{batch} ctx{context}: {time.time() - t0:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
