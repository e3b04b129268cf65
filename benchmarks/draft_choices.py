"""Which way of building the self-draft's sparse cache accepts more, on real text?

    python benchmarks/draft_choices.py [--batch 4] [--context 4096] [--budget 512] [--gamma 3] [--out FILE]

Serves one batch of Austen passages (from the second half of each novel — text the defaults were not
tuned on, `region="tail"`) on one engine core: plainly first (which leaves the prompts in the prefix
cache), then greedily with StreamingLLM self-speculation two ways:
the draft cache's KV copied from the target's (`DraftTuning.kv_source="target"`, the default) or computed
by the draft itself into a pool of its own ("own": turning it on empties the prefix cache, so its prompts
are prefilled again, the draft's KV with them); plus SnapKV selection for reference. Prints and
writes acceptance, tokens per verification and per-position acceptance, and checks that every run's
tokens equal plain decoding's. Acceptance does not depend on the batch size, so a small batch suffices.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig
from magicdec.bench.corpora import load_corpus, make_prompts
from magicdec.bench.grid import grid_core

CHOICES = {  # name → (drafter, where the draft cache's KV comes from)
    "streaming target-KV": ("streaming", "target"),
    "streaming own-KV": ("streaming", "own"),
    "snapkv target-KV": ("snapkv", "target"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    llm = LLM()
    prompts = make_prompts(llm.tokenizer, load_corpus("austen"), args.batch, args.context, seed=args.seed,
                           region="tail")
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    specs = {name: SpecConfig(method="self", drafter=drafter, budget=args.budget, gamma=args.gamma,
                              tuning=DraftTuning(kv_source=kv_source))
             for name, (drafter, kv_source) in CHOICES.items()}
    core = grid_core(llm, prompts, params, list(specs.values()))  # room for the own-KV draft's pool and γ
    try:
        t0 = time.perf_counter()
        plain_run = llm.run(core, prompts, params)  # its prompts stay in the prefix cache
        print(f"plain run of {args.batch} × {args.context} tokens: {time.perf_counter() - t0:.0f} s", flush=True)
        plain = [o.token_ids for o in plain_run.outputs]
        rows = []
        for name, spec in specs.items():
            core.set_speculation(spec)
            core.forget_outputs()
            r = llm.run(core, prompts, params)
            s = r.stats
            row = {"choice": name, "config": spec.label, "kv_source": spec.tuning.kv_source,
                   "acceptance": s.acceptance_rate, "mean_accepted_tokens": s.mean_accepted_tokens,
                   "per_position": s.acceptance.per_position_acceptance, "prefill_s": s.prefill_s,
                   "prefix_cached_tokens": s.extra["prefix_cached_tokens"],
                   "matches_plain": [o.token_ids for o in r.outputs] == plain}
            rows.append(row)
            print(f"{name:22s} acceptance {row['acceptance']:.3f}  tokens/verification "
                  f"{row['mean_accepted_tokens']:.2f}  per position {[round(p, 2) for p in row['per_position']]}"
                  f"  = plain: {row['matches_plain']}", flush=True)
    finally:
        core.close()
    if args.out:
        record = {"command": vars(args) | {"out": str(args.out)}, "date": time.strftime("%Y-%m-%d"),
                  "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
                  "results": rows}
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
