"""Two serving checks on the built-in model and real text (issue 16's "done when"):

1. prefix cache — a 4K-token passage asked about twice (different questions): the second request's time
   to first token against the first's;
2. admission — requests decoding while a 7K-token prompt arrives: their largest gap between two tokens
   against the time the 7K prompt's whole prefill takes, and the budget's one-step bound.

    .venv/bin/python benchmarks/serving_checks.py [--spec self|none] [--out benchmarks/results/cpu_serving_checks.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from magicdec import LLM, Engine, SamplingParams, SpecConfig
from magicdec.bench.corpora import load_corpus, make_prompts


def prefix_check(llm: LLM, spec: SpecConfig | None, corpus: object) -> dict:
    doc = make_prompts(llm.tokenizer, corpus, lengths=[4096], seed=101)[0]
    questions = [llm.tokenizer.encode("\n\nQuestion: who speaks first in this passage? Answer:", False),
                 llm.tokenizer.encode("\n\nQuestion: where does this scene take place? Answer:", False)]
    engine = Engine(llm=llm, spec=spec, quiet=True)
    ttft = []
    for q in questions:
        t0 = time.monotonic()
        out = engine.run([doc + q], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
        ttft.append(out.metrics.first_token - t0)
    engine.check_no_leaks()
    return {"prompt_tokens": [len(doc) + len(q) for q in questions], "ttft_s": ttft, "ratio": ttft[1] / ttft[0],
            "cached_tokens": engine.prefix_cache.hits, "hit_rate": engine.prefix_cache.hit_rate}


def admission_check(llm: LLM, spec: SpecConfig | None, corpus: object, budget: int) -> dict:
    running = make_prompts(llm.tokenizer, corpus, lengths=[1024] * 4, seed=202)
    long = make_prompts(llm.tokenizer, corpus, lengths=[7168], seed=303)[0]
    engine = Engine(llm=llm, spec=spec, max_num_batched_tokens=budget, quiet=True)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=400, ignore_eos=True)) for p in running]
    while not all(r.status.value == "decoding" for r in engine.core.scheduler.running) or engine.num_waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    t_add = time.monotonic()
    lid = engine.add_request(long, SamplingParams(max_new_tokens=2, ignore_eos=True))
    steps = []
    while engine.core.requests[lid].output == []:
        t0 = time.monotonic()
        engine.step()
        steps.append((time.monotonic() - t0, engine.core.last_report.prefill_tokens))
    t_first = engine.core.requests[lid].metrics.first_token
    gaps = []
    for rid in ids:
        times = [t for t in engine.core.requests[rid].metrics.token_times if t_add <= t <= t_first]
        gaps += [b - a for a, b in zip(times, times[1:])]
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_no_leaks()
    return {"long_prompt_tokens": len(long), "budget": budget, "admission_s": t_first - t_add,
            "admission_steps": len(steps), "max_step_s": max(s for s, _ in steps),
            "max_itl_s": max(gaps), "mean_itl_s": sum(gaps) / len(gaps),
            "max_prefill_tokens_per_step": max(n for _, n in steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", choices=("self", "none"), default="self")
    ap.add_argument("--budget", type=int, default=1024, help="max_num_batched_tokens")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    llm = LLM(device="cpu")
    spec = SpecConfig(method="self", budget=256, sinks=4, gamma="auto") if args.spec == "self" else None
    corpus = load_corpus("austen")
    result = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cpus",
              "spec": args.spec, "prefix": prefix_check(llm, spec, corpus),
              "admission": admission_check(llm, spec, corpus, args.budget)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
