"""What model-free drafting costs per round at a large batch of long contexts: prompt lookup and suffix matching.

    python benchmarks/lookup_cost.py [--batch 32] [--context 8192] [--k 8] [--rounds 64] [--out FILE]

Cuts `batch` Austen passages of `context` tokens (second halves of the novels, the built-in model's
tokenizer), indexes each in a proposer, then runs `rounds` rounds: every request proposes up to k tokens,
accepts the prefix equal to the book's own continuation and appends it plus the next token (what the
engine's proposal and commit would do). Prints seconds per round for the whole batch next to the decode step
the cost model predicts for the same batch on this machine (`magicdec profile`'s saved profile if any, else
the built-in one), and the suffix automaton's mean occurrence-update walk per token.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from magicdec.bench.corpora import load_corpus, make_prompts
from magicdec.bench.lookup_sim import PROPOSERS, matching_cost
from magicdec.costmodel.device import device_profile
from magicdec.costmodel.steps import CostModel, DraftSpec
from magicdec.loading import load_model
from magicdec.spec.suffix import SuffixAutomaton


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proposers", default="ngram,ngram-frequent,suffix")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    loaded = load_model(None, device="cpu")
    extra = args.rounds * (args.k + 1)
    rows = make_prompts(loaded.tokenizer, load_corpus("austen"), args.batch, args.context + extra, args.seed,
                        region="tail")
    prompts, conts = [r[: args.context] for r in rows], [r[args.context :] for r in rows]
    cost = CostModel(loaded.config, device_profile(torch.device("cpu"), loaded.config), DraftSpec("self", 512),
                     dtype_bytes=4)
    step = cost.t_target(args.batch, args.context)
    sa = SuffixAutomaton()
    walks = 0
    for t in prompts[0]:
        sa.append([t])
        walks += sa.chain
    print(f"batch {args.batch} × {args.context} tokens, k = {args.k}, {args.rounds} rounds; predicted decode step "
          f"{step * 1e3:.1f} ms (cost model, CPU); suffix automaton: {walks / len(prompts[0]):.2f} states updated "
          "per appended token")
    results = []
    for name in args.proposers.split(","):
        r = matching_cost(PROPOSERS[name], prompts, conts, args.k, args.rounds)
        r.update(proposer=name, step_s_predicted=step, share_of_step=r["round_s_mean"] / step)
        results.append(r)
        print(f"{name:>15}: {r['round_s_mean'] * 1e3:7.2f} ms per round (median {r['round_s_median'] * 1e3:.2f}, "
              f"max {r['round_s_max'] * 1e3:.2f}) = {100 * r['share_of_step']:.2f}% of a decode step; "
              f"index build {r['build_s']:.2f} s once; {r['accepted_per_request_round']:.2f} accepted per round")
    if args.out:
        meta = {"batch": args.batch, "context": args.context, "k": args.k, "rounds": args.rounds,
                "machine": platform.processor() or platform.machine()}
        args.out.write_text("".join(json.dumps({**meta, **r}) + "\n" for r in results))


if __name__ == "__main__":
    main()
