"""Acceptance of the guided self-draft (verification-guided block selection) vs the StreamingLLM self-draft.

Same prompts, same budget, same γ, greedy: the serving engine's self-speculation with `drafter="streaming"`
(the first `sinks` tokens + the most recent budget − sinks) and with `drafter="guided"` (the first block,
the blocks the last verification attended to most, and a recent window). Passages of real text cut from
the Austen corpus (`make_prompts`, one book per prompt by its round robin; seed `--seed` + the context's
index, seeds used for nothing else), batch 1 (each prompt alone) and optionally larger batches.

To prefill each prompt once, one engine per (context, batch) serves every configuration in turn: the
engine's draft is swapped between runs and the prompts' blocks come from its prefix cache. Verification is
exact, so every configuration must produce the same tokens (checked).

    .venv/bin/python benchmarks/guided_selection.py --contexts 2048 4096 --budgets 256 512 --out guided.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.data import load_corpus, make_prompts
from magicdec.engine.core import PagedDraft
from magicdec.engine.outputs import Acceptance
from magicdec.spec.config import DraftTuning


def draft_for(engine: Engine, spec: SpecConfig) -> PagedDraft:
    """The engine's self-draft for `spec` (as `Engine.__init__` builds it)."""
    P = engine.core.cache.block_size
    model = engine.llm.model
    if spec.drafter == "guided":
        return PagedDraft(model, None, 0, spec.recent_window, select=(spec.budget - spec.recent_window) // P)
    return PagedDraft(model, None, spec.sinks, spec.recent_window)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per context (each from another book)")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--sinks", type=int, default=16)
    ap.add_argument("--guided-windows", type=int, nargs="+", default=[64],
                    help="recent windows of the guided draft to compare (tuning.snapkv_window; ≤ budget / 2)")
    ap.add_argument("--new", type=int, default=48, help="new tokens per prompt")
    ap.add_argument("--seed", type=int, default=9101, help="prompt seed of the first context (+1 per context)")
    ap.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    llm = LLM(args.model, device="cpu")
    tok = llm.tokenizer
    corpus = load_corpus("austen")
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    configs = [("streaming", 0)] + [("guided", w) for w in args.guided_windows]
    rows = []
    t_start = time.perf_counter()
    for ci, ctx in enumerate(args.contexts):
        seed = args.seed + ci
        prompts = make_prompts(tok, corpus, lengths=[ctx] * args.prompts, seed=seed)
        for batch in args.batches:
            groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
            base = SpecConfig(method="self", drafter="streaming", budget=args.budgets[0], sinks=args.sinks,
                              gamma=args.gamma)
            engine = Engine(llm=llm, spec=base, max_num_seqs=batch, max_model_len=ctx + args.new + 64,
                            prefill_chunk=512, max_num_batched_tokens=2048, quiet=True)
            reference: list[list[int]] | None = None
            for budget in args.budgets:
                for drafter, window in configs:
                    tuning = DraftTuning(snapkv_window=window) if window else DraftTuning()
                    spec = SpecConfig(method="self", drafter=drafter, budget=budget, sinks=args.sinks,
                                      gamma=args.gamma, tuning=tuning)
                    name = drafter if drafter == "streaming" else f"guided-w{spec.recent_window}"
                    engine.core.draft = draft_for(engine, spec)
                    engine.core.stats.spec = Acceptance()
                    t0 = time.perf_counter()
                    tokens = [o.token_ids for g in groups for o in engine.run(g, params)]
                    seconds = time.perf_counter() - t0
                    if reference is None:
                        reference = tokens
                    same = tokens == reference
                    acc = engine.stats.spec
                    row = dict(context=ctx, batch=batch, budget=budget, drafter=name, gamma=args.gamma,
                               prompts=len(prompts), seed=seed, acceptance_rate=acc.acceptance_rate,
                               mean_accepted_tokens=acc.mean_accepted_tokens,
                               per_position=acc.per_position_acceptance, rounds=acc.rounds,
                               draft_tokens=acc.draft_tokens, same_tokens=same, seconds=seconds)
                    rows.append(row)
                    pp = " ".join(f"{x:.2f}" for x in row["per_position"])
                    print(f"ctx {ctx:5d}  batch {batch}  budget {budget:4d}  {name:14s}  acceptance "
                          f"{row['acceptance_rate']:.3f}  per position [{pp}]  tokens/round "
                          f"{row['mean_accepted_tokens']:.2f}  same tokens {same}  ({seconds:.1f} s)", flush=True)
                    if not same:
                        print("ERROR: the tokens differ between configurations (verification must be exact)",
                              file=sys.stderr)
            engine.close()

    print()
    print("| context | batch | budget | drafter | acceptance | per position | tokens / round |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['budget']} | {r['drafter']} | {r['acceptance_rate']:.3f} | "
              f"{' / '.join(f'{x:.2f}' for x in r['per_position'])} | {r['mean_accepted_tokens']:.2f} |")
    result = dict(
        benchmark="guided_selection", model=str(args.model or "built-in"), corpus="austen", new_tokens=args.new,
        gamma=args.gamma, sinks=args.sinks, machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), seconds=time.perf_counter() - t_start, rows=rows,
        command="python benchmarks/guided_selection.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
