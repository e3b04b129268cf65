"""Acceptance and speedup of the serving engine's self-drafts on held-out real text (issue 18).

StreamingLLM, SnapKV and verification-guided selection (`--drafters`), each with the target's weights or
quantized ones (`--weights`), at each KV budget (`--budgets`: a token count, or a fraction of the context
such as 0.0625, rounded to a multiple of the 64-token block) and γ (`--gammas`, integers or auto), against
plain decoding, at each context and batch size; greedy, EOS ignored, `--new` tokens per prompt.

Prompts: `--prompts` passages per context cut from the corpus by `make_prompts` (round robin over the books:
one book per prompt while there are books left; six in the Austen corpus) from the second half of each book
(`--region tail`, the half `benchmarks/draft_choices.py` holds out) at offsets drawn from `--seed` + the
context (so a grid split over several processes, one context each, cuts the same passages). The default seed,
31337, is used nowhere else in the repository (held out).

One engine per context (prefix caching on, a pool holding every prompt) serves everything: each group of
`batch` prompts is first run plain, untimed (its prefill, and the reference tokens), then the configuration
list — plain and every drafter × weights × budget × γ, switched with `Engine.set_spec` — runs `--repeats`
times interleaved, each prompt coming from the prefix cache but for its last prefill chunk (`--prefill-chunk`).
The decode time of a run is the wall time of its steps that decoded, less the prefill chunks inside them
(SnapKV's selection runs at the end of the prompt's prefill, so it is not counted); speedup = plain's decode
time / the configuration's, per repeat (summed over the groups), reported as median and min–max. Verification
is exact, so every run's tokens must equal plain's: a difference is printed and makes the command exit with
status 1.

    .venv/bin/python benchmarks/drafter_grid.py --contexts 2048 4096 --batches 1 4 --budgets 256 0.0625 \\
        --drafters streaming snapkv guided --weights full int8 --gammas 3 auto --out grid.json

Writes JSON (`--out`: every row, the command, the machine and threads) and a markdown table (`--md`, default
beside the JSON; always printed). Guided drafters: `guided` (a block's score: the max over the verification's
layers), `guided-sum` (summed over layers), `guided-layer` (each layer of the draft reads its own best blocks);
`--guided-window` sets their recent window (default: min(64, budget / 2)).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.bench.corpora import load_corpus, make_prompts
from magicdec.bench.report import git_commit, machine
from magicdec.cli.args import parse_gamma
from magicdec.engine.outputs import Acceptance
from magicdec.serving import DEFAULT_BLOCK_SIZE as BLOCK
from magicdec.spec.config import DraftTuning

SEED = 31337  # held out: no other benchmark, test or document uses it


def parse_budget(text: str) -> float:
    """A token count (≥ 1) or a fraction of the context (0 < f < 1)."""
    x = float(text)
    if x <= 0 or (x >= 1 and x != int(x)):
        raise argparse.ArgumentTypeError(f"a budget is a token count or a fraction in (0, 1), got {text!r}")
    return x if x < 1 else int(x)


def tokens_for(budget: float, ctx: int) -> int:
    return int(budget) if budget >= 1 else max(BLOCK, round(budget * ctx / BLOCK) * BLOCK)


def configs(args: argparse.Namespace, ctx: int) -> list[tuple[str, SpecConfig | None]]:
    """(budget as asked, spec) for plain and every drafter × weights × budget × γ valid at `ctx`."""
    out: list[tuple[str, SpecConfig | None]] = [("", None)]
    for b in args.budgets:
        for drafter in args.drafters:
            for weights in args.weights:
                for gamma in args.gammas:
                    try:
                        # guided-sum: block scores summed over layers; guided-layer: each layer its own blocks
                        kind, _, pooling = drafter.partition("-")
                        tuning = DraftTuning(guided_scores=pooling or "max",
                                             guided_window=args.guided_window if kind == "guided" else None)
                        spec = SpecConfig(method="self", drafter=kind, budget=tokens_for(b, ctx), sinks=args.sinks,
                                          gamma=gamma, draft_weights=weights, tuning=tuning)
                        least = spec.recent_window + (2 if args.guided_window else 1) * BLOCK
                        if kind == "guided" and spec.budget < least:
                            raise ValueError(f"guided needs a budget ≥ {least}")
                    except ValueError as e:
                        print(f"skipped at context {ctx}: {drafter} {weights} budget {b} γ {gamma}: {e}")
                        continue
                    if all(s != spec for _, s in out):  # a fraction may give a budget also asked as a count
                        out.append((str(b), spec))
    return out


def timed_run(engine: Engine, group: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    """Serve `group` at once; its tokens, summed acceptance, decode time, γ chosen and preemptions."""
    ids = [engine.add_request(p, params) for p in group]
    final, decode_s, gammas = {}, 0.0, Counter()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
        rep = engine.last_step
        if rep is not None and rep.request_ids:
            decode_s += rep.seconds - rep.prefill_s
            gammas.update(rep.gammas)
    acc = Acceptance()
    for i in ids:
        acc.merge(final[i].spec)
    return dict(tokens=[final[i].token_ids for i in ids], acc=acc, decode_s=decode_s,
                wall_s=time.perf_counter() - t0, gammas=gammas,
                preemptions=sum(final[i].metrics.preemptions for i in ids),
                cached=sum(final[i].metrics.cached_tokens for i in ids))


def drafter_name(spec: SpecConfig | None) -> str:
    if spec is None:
        return "plain"
    pooling = spec.tuning.guided_scores if spec.drafter == "guided" else "max"
    return spec.drafter + ("" if pooling == "max" else f"-{pooling}")


def spec_key(spec: SpecConfig | None) -> str:
    return "plain" if spec is None else spec.label.replace(spec.drafter, drafter_name(spec), 1)


def measure(engine: Engine, prompts: list[list[int]], batch: int, ctx: int, args: argparse.Namespace,
            cfgs: list[tuple[str, SpecConfig | None]]) -> list[dict[str, Any]]:
    """Rows of every configuration at one (context, batch), summed over the groups of `batch` prompts."""
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    decode = {spec_key(s): [0.0] * args.repeats for _, s in cfgs}
    wall = {k: [0.0] * args.repeats for k in decode}  # the whole run: also the recomputed last prefill chunk
    acc = {spec_key(s): Acceptance() for _, s in cfgs}
    gammas = {spec_key(s): Counter() for _, s in cfgs}
    same = dict.fromkeys(decode, True)
    preempted, cached = Counter(), Counter()
    for g in groups:
        engine.set_spec(None)
        reference = timed_run(engine, g, params)["tokens"]  # untimed: prefills the group (or hits the cache)
        for rep in range(args.repeats):
            for _, spec in cfgs:
                key = spec_key(spec)
                engine.set_spec(spec)
                r = timed_run(engine, g, params)
                decode[key][rep] += r["decode_s"]
                wall[key][rep] += r["wall_s"]
                preempted[key] += r["preemptions"]
                cached[key] += r["cached"]
                if r["tokens"] != reference:
                    same[key] = False
                    print(f"EXACTNESS VIOLATION: ctx {ctx} batch {batch} {key}: tokens differ from plain's",
                          file=sys.stderr)
                acc[key].merge(r["acc"])  # over the repeats: γ auto's choices vary with the measured step times
                gammas[key].update(r["gammas"])
        print(f"  ctx {ctx} batch {batch}: group of {len(g)} done ({time.strftime('%H:%M:%S')})", file=sys.stderr,
              flush=True)
    engine.set_spec(None)
    rows = []
    plain = decode["plain"]
    for asked, spec in cfgs:
        key = spec_key(spec)
        ratios = [p / d for p, d in zip(plain, decode[key])]
        a = acc[key]
        row: dict[str, Any] = dict(
            context=ctx, batch=batch, prompts=len(prompts), groups=len(groups), config=key,
            drafter=drafter_name(spec), weights=spec.draft_weights if spec else None,
            budget=spec.budget if spec else None, budget_asked=asked or None,
            window=spec.recent_window if spec is not None and spec.drafter != "streaming" else None,
            gamma=None if spec is None else str(spec.gamma), decode_s=decode[key], wall_s=wall[key],
            decode_tokens=len(prompts) * (args.new - 1), speedup=statistics.median(ratios), speedup_min=min(ratios),
            speedup_max=max(ratios), speedups=ratios, same_tokens=same[key], preemptions=preempted[key],
            cached_prompt_share=cached[key] / (args.repeats * len(prompts) * ctx))
        if spec is not None:
            drafted = a.draft_tokens > 0  # γ auto may choose γ = 0 (plain steps) throughout
            row.update(acceptance_rate=a.acceptance_rate if drafted else None,
                       mean_accepted_tokens=a.mean_accepted_tokens if drafted else None,
                       per_position=a.per_position_acceptance, rounds=a.rounds, draft_tokens=a.draft_tokens,
                       gamma_counts={str(k): v for k, v in sorted(gammas[key].items())})
        rows.append(row)
        print(row_line(row), flush=True)
    return rows


def row_line(r: dict[str, Any]) -> str:
    budget = "—" if r["budget"] is None else (f"{r['budget_asked']}→{r['budget']}" if "." in str(r["budget_asked"])
                                              else str(r["budget"]))
    pp = " / ".join(f"{x:.2f}" for x in r.get("per_position", [])) or "—"
    acc = "—" if r.get("acceptance_rate") is None else f"{r['acceptance_rate']:.3f}"
    tpr = "—" if r.get("mean_accepted_tokens") is None else f"{r['mean_accepted_tokens']:.2f}"
    if r["drafter"] == "plain":
        tps = statistics.median(r["decode_tokens"] / s for s in r["decode_s"])
        tpr = f"({tps:.1f} tok/s)"
    return (f"| {r['context']} | {r['batch']} | {budget} | {r['drafter']} | {r['weights'] or '—'} "
            f"| {r['gamma'] or '—'} | {acc} | {pp} | {tpr} "
            f"| {r['speedup']:.2f} ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) "
            f"| {'yes' if r['same_tokens'] else '**NO**'} |")


HEAD = ("| context | batch | budget | drafter | weights | γ | acceptance | per position | tokens / round "
        "| speedup (min–max) | same tokens |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 6144, 7680])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--budgets", type=parse_budget, nargs="+", default=[256, 512, 1024],
                    help="token counts, or fractions of the context (0.0625: ctx/16, rounded to 64 tokens)")
    ap.add_argument("--drafters", nargs="+", choices=["streaming", "snapkv", "guided", "guided-sum", "guided-layer"],
                    default=["streaming", "snapkv", "guided"])
    ap.add_argument("--guided-window", type=int, default=None,
                    help="the guided drafts' recent window in tokens (default: min(64, budget / 2))")
    ap.add_argument("--weights", nargs="+", choices=["full", "int8", "int4"], default=["full", "int8", "int4"])
    ap.add_argument("--gammas", type=parse_gamma, nargs="+", default=[3, parse_gamma("auto")])
    ap.add_argument("--sinks", type=int, default=16, help="StreamingLLM's attention sinks (the CLI's default)")
    ap.add_argument("--prompts", type=int, default=8, help="passages per context (served in groups of each batch)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of the configuration list")
    ap.add_argument("--seed", type=int, default=SEED, help="prompt seed (+ the context length)")
    ap.add_argument("--region", default="tail", help="where passages are cut: any, head or tail half of each book")
    ap.add_argument("--corpus", default="austen", help="austen, pg19 or a path")
    ap.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    ap.add_argument("--prefill-chunk", type=int, default=64,
                    help="prefill chunk (tokens): each run recomputes the prompt's last chunk, the rest is cached")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--md", type=Path, default=None, help="write the table here (default: --out with .md)")
    args = ap.parse_args(argv)
    if max(args.batches) > args.prompts:
        ap.error(f"--prompts ({args.prompts}) must be ≥ the largest batch ({max(args.batches)})")

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, device="cpu")
    corpus = load_corpus(args.corpus)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    print(HEAD, flush=True)
    for ctx in args.contexts:
        prompts = make_prompts(llm.tokenizer, corpus, lengths=[ctx] * args.prompts, seed=args.seed + ctx,
                               region=args.region)
        cfgs = configs(args, ctx)
        max_gamma = max(s.gamma_bound for _, s in cfgs if s is not None)
        kept = max(-(-s.budget // BLOCK) for _, s in cfgs if s is not None)
        per_prompt = -(-(ctx + args.new + max_gamma + 1) // BLOCK) + 1
        blocks = args.prompts * per_prompt + max(args.batches) * (kept + 1)  # every prompt stays cached
        engine = Engine(llm=llm, spec=None, max_num_seqs=max(args.batches), max_model_len=ctx + args.new + 64,
                        prefill_chunk=args.prefill_chunk, max_num_batched_tokens=2048, num_blocks=blocks, quiet=True)
        for weights in sorted({s.draft_weights for _, s in cfgs if s is not None}):  # quantize, build kernels
            engine.set_spec(SpecConfig(method="self", budget=256, sinks=args.sinks, gamma=2, draft_weights=weights))
            timed_run(engine, prompts[:1], SamplingParams(max_new_tokens=4, ignore_eos=True))
        for batch in args.batches:
            rows += measure(engine, prompts, batch, ctx, args, cfgs)
        engine.close()

    table = "\n".join([HEAD, *map(row_line, rows)]) + "\n"
    argv_ = sys.argv[1:] if argv is None else argv
    result = dict(benchmark="drafter_grid", command="python benchmarks/drafter_grid.py " + " ".join(argv_),
                  model=str(args.model or "built-in"), corpus=args.corpus, region=args.region, seed=args.seed,
                  new_tokens=args.new, sinks=args.sinks, guided_window=args.guided_window, repeats=args.repeats,
                  threads=torch.get_num_threads(),
                  machine=machine(llm.device), magicdec_commit=git_commit(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=time.perf_counter() - t_start,
                  rows=rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        md = args.md or args.out.with_suffix(".md")
        md.write_text(f"`{result['command']}`\n\n{table}")
        print(f"wrote {args.out} and {md}")
    elif args.md is not None:
        args.md.write_text(f"`{result['command']}`\n\n{table}")
    print(f"{result['seconds']:.0f} s")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
