"""Pivot a `magicdec bench` results.jsonl into compact markdown tables.

    python benchmarks/pivot.py results/cpu-grid/results.jsonl [--auto-check]

Prints, per speculation method, drafter and budget, one row per (batch, context) with the speedup over
plain decoding and the acceptance at every fixed γ, and `auto`'s speedup with the γ it chose. With
`--auto-check`, also a table of `gamma=auto` against the best fixed γ at each point (plain decoding, γ = 0,
included): the ratio of their measured throughputs (tokens/s from the median decode time) and whether it is
within 5%, and the same comparison by the median of per-round speedups over plain, and by the median over
repetitions of auto's speed relative to the best fixed γ in the same repetition, with a 90% bootstrap
interval (how much a verdict of this one run is worth: on a noisy machine the interval is wide), and against
the fixed γ that was fastest on the other half of the repetitions.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import defaultdict
from pathlib import Path

from magicdec.bench.report import gamma_label, read_jsonl


def drafter(rec: dict) -> str:
    """'self-streaming', 'self-snapkv', 'draft-streaming', 'draft-full' ('plain' for plain decoding). Records
    written before `method` existed name a draft model's drafter 'draft' or 'draft-full'."""
    d = rec["drafter"]
    if d == "plain" or rec.get("config") == "plain":
        return "plain"
    if "method" in rec:
        return f"{rec['method']}-{d}"
    return {"draft": "draft-streaming"}.get(d, d if d.startswith("draft") else f"self-{d}")


def rounds(rec: dict) -> str:
    """'0×29 1×1': how many rounds auto ran at each γ."""
    return gamma_label(rec).removeprefix("auto: ")


def speedup_tables(points: list[dict]) -> str:
    groups: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    gammas: dict[tuple, set] = defaultdict(set)
    for r in points:
        if drafter(r) == "plain":
            continue
        key = (drafter(r), r["budget"])
        groups[key][(r["batch"], r["context"], str(r["gamma"]))] = r
        gammas[key].add(str(r["gamma"]))
    out = []
    for (name, budget), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        fixed = sorted((g for g in gammas[(name, budget)] if g != "auto"), key=int)
        has_auto = "auto" in gammas[(name, budget)]
        out.append(f"\n**{name}, {'full cache' if budget is None else f'budget {budget}'}** — speedup over plain "
                   "(acceptance)\n")
        head = ["batch", "context", *[f"γ={g}" for g in fixed]] + (["auto (γ chosen: rounds)"] if has_auto else [])
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for b, c in sorted({(k[0], k[1]) for k in recs}):
            cells = [str(b), str(c)]
            for g in fixed:
                r = recs.get((b, c, g))
                cells.append("—" if r is None else f"{r['speedup']:.2f} ({r['acceptance_rate']:.2f})")
            if has_auto:
                r = recs.get((b, c, "auto"))
                cells.append("—" if r is None else f"{r['speedup']:.2f} ({rounds(r)})")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def paired(best: dict, auto: dict, resamples: int = 2000) -> tuple[float, float, float]:
    """Median over repetitions of best's decode time / auto's in the same repetition (> 1: auto faster),
    and a 90% bootstrap interval of that median."""
    ratios = [b / a for b, a in zip(best["decode_s_all"], auto["decode_s_all"])]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), meds[int(0.05 * resamples)], meds[int(0.95 * resamples) - 1]


def held_out(fixed: list[dict], auto: dict) -> float:
    """auto's throughput over that of the fixed γ that was fastest on the other half of the repetitions
    (even / odd), averaged over both halves: "the best fixed γ" as a previous benchmark would have picked
    it, free of the upward bias of taking the fastest of several noisy medians."""
    def med(r: dict, half: int) -> float:
        return statistics.median(r["decode_s_all"][half::2])

    ratios = []
    for pick, judge in ((0, 1), (1, 0)):
        chosen = min(fixed, key=lambda r: med(r, pick))
        ratios.append(med(chosen, judge) / med(auto, judge))
    return statistics.mean(ratios)


def auto_check(points: list[dict]) -> str:
    """auto against the best fixed γ (plain decoding included) at each point, by measured throughput
    (tokens/s from each configuration's median decode time) and by the median of the per-round speedups
    over plain (each repetition's ratio to the plain run of the same round), by the median of per-repetition
    ratios with a bootstrap interval, and against the best fixed γ chosen on held-out repetitions."""
    by_point: dict[tuple, list[dict]] = defaultdict(list)
    plain: dict[tuple, dict] = {}
    for r in points:
        if drafter(r) == "plain":
            plain[(r["batch"], r["context"])] = r
        else:
            by_point[(drafter(r), r["budget"], r["batch"], r["context"])].append(r)
    out = ["| drafter | budget | batch | context | best fixed γ: tok/s | auto: tok/s (γ: rounds) | auto / best "
           "| within 5% | by median speedup: best / auto | paired: median [90% interval] | held-out best |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    hits = total = held_hits = 0
    for key, recs in sorted(by_point.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, *kv[0][2:])):
        auto = next((r for r in recs if r["gamma"] == "auto"), None)
        if auto is None:
            continue
        fixed = [plain[key[2:]], *(r for r in recs if r["gamma"] != "auto")]
        best = max(fixed, key=lambda r: r["tokens_per_s"])
        best_speedup = max([1.0, *(r["speedup"] for r in fixed[1:])])
        ratio = auto["tokens_per_s"] / best["tokens_per_s"]
        ok = ratio >= 0.95
        hits, total = hits + ok, total + 1
        held = held_out(fixed, auto)
        held_hits += held >= 0.95
        g = 0 if drafter(best) == "plain" else best["gamma"]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | γ={g}: {best['tokens_per_s']:.1f} "
                   f"| {auto['tokens_per_s']:.1f} ({rounds(auto)}) | {ratio:.3f} | {'yes' if ok else 'no'} "
                   f"| {best_speedup:.2f} / {auto['speedup']:.2f} = {auto['speedup'] / best_speedup:.3f} "
                   "| {:.3f} [{:.3f}, {:.3f}] ".format(*paired(best, auto)) + f"| {held:.3f} |")
    out.append(f"\nauto within 5% of the best fixed γ's throughput at {hits} of {total} points; of the held-out best's "
               f"at {held_hits} of {total}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--auto-check", action="store_true")
    args = ap.parse_args()
    header, records = read_jsonl(args.results)
    points = [r for r in records if r.get("engine") == "magicdec"]
    print(f"`{header['command']}` — {header['machine'].get('cpu')}, {header['machine'].get('cores')} cores, "
          f"commit {header.get('magicdec_commit')}")
    print(speedup_tables(points))
    if args.auto_check:
        print()
        print(auto_check(points))


if __name__ == "__main__":
    main()
