"""How much would model-free drafts accept on each workload? An offline proxy on the built-in model.

    python benchmarks/lookup_acceptance.py [--contexts 2048,4096] [--n 4] [--new 64] [--k 8] [--split eval]
                                           [--outputs FILE] [--out FILE]

Builds each workload of `magicdec.bench.workloads` (split "eval": passages never used for tuning), decodes
every prompt greedily with the built-in model (plain decoding, `LLM.generate`), then replays each proposer
along those outputs (`magicdec.bench.lookup_sim.replay`: per round up to k drafted tokens, the prefix equal
to the greedy output accepted, plus the next token). Greedy verification accepts exactly that prefix, so
these are the accepted lengths a real run with the proposer would have. "suffix+global" also lets the
suffix proposer match the earlier outputs of the same workload (its global store); "ngram+choice" and
"suffix+choice" pass each proposal through the hybrid's cost-aware choice (`magicdec.spec.hybrid.choose`, no
self-draft: the proposal cut where it stops paying, or a plain step) with verification costing 1 +
`--per-position` · n plain steps. "speedup proxy": tokens per unit of that time (matching, the round's
bookkeeping and the self-draft left out). `--outputs` keeps the greedy outputs (JSON lines) and reuses
them when the file exists.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from magicdec.bench.corpora import load_corpus
from magicdec.bench.lookup_sim import PROPOSERS, replay_all
from magicdec.bench.workloads import WORKLOADS, build_workload
from magicdec.spec.hybrid import RoundCosts
from magicdec.spec.suffix import SuffixProposer, SuffixTrie


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="eval")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--per-position", type=float, default=0.05,
                    help="verification cost of one more draft position, in plain steps (the proxy's and the "
                         "hybrid choice's T_V(n)/T_T = 1 + this · n)")
    ap.add_argument("--outputs", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from magicdec import LLM, SamplingParams

    corpus = load_corpus("austen")
    saved: dict[tuple[str, int], list[dict]] = {}
    if args.outputs and args.outputs.exists():
        for line in args.outputs.read_text().splitlines():
            rec = json.loads(line)
            saved.setdefault((rec["workload"], rec["context"]), []).append(rec)
    llm = None
    rows = []
    for context in map(int, args.contexts.split(",")):
        for name in args.workloads.split(","):
            recs = saved.get((name, context))
            if recs is None or len(recs) < args.n:
                if llm is None:
                    llm = LLM(device="cpu")
                prompts = build_workload(name, llm.tokenizer, corpus, context, args.n, args.seed, args.split)
                result = llm.generate([p.tokens for p in prompts], SamplingParams(max_new_tokens=args.new))
                recs = [{"workload": name, "context": context, "prompt": p.tokens, "output": o.token_ids,
                         "reference": p.reference, "document": p.document, "text": o.text}
                        for p, o in zip(prompts, result.outputs)]
                if args.outputs:
                    with args.outputs.open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in recs)
            pairs = [(r["prompt"], r["output"]) for r in recs[: args.n]]
            stats = {name_: replay_all(make, pairs, args.k) for name_, make in PROPOSERS.items()}
            shared = SuffixTrie()
            stats["suffix+global"] = replay_all(functools.partial(SuffixProposer, shared), pairs, args.k, shared)
            costs = RoundCosts(verify=lambda n: 1.0 + args.per_position * n)
            for base in ("ngram", "suffix"):
                stats[f"{base}+choice"] = replay_all(PROPOSERS[base], pairs, args.k, costs=costs)
            for pname, r in stats.items():
                row = {"workload": name, "context": context, "proposer": pname, **r.summary(),
                       "speedup_proxy": round(r.speedup(args.per_position), 3)}
                rows.append(row)
                print(f"{name:>12} {context:5d} {pname:>15}: mean accepted {row['mean_accepted']:.2f}, tokens/round "
                      f"{row['tokens_per_round']:.2f}, acceptance {row['acceptance']:.2f}, proposing in "
                      f"{100 * row['proposal_rate']:.0f}% of rounds, speedup proxy {row['speedup_proxy']:.2f}",
                      flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
