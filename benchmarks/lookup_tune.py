"""Tune the model-free proposers' settings on the "tune" split's greedy outputs (never the reported ones).

    python benchmarks/lookup_acceptance.py --split tune --outputs tune.jsonl    # greedy outputs, once
    python benchmarks/lookup_tune.py tune.jsonl [--k 8] [--per-position 0.05]

Replays each setting of a small grid (`magicdec.bench.lookup_sim.replay`) along the saved outputs and prints
the speedup proxy (tokens per unit time with verification costing 1 + per_position · n plain steps), the mean
over workloads, best first.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from collections import defaultdict
from pathlib import Path

from magicdec.bench.lookup_sim import ProposerFactory, replay_all
from magicdec.spec.ngram import NgramProposer
from magicdec.spec.suffix import SuffixProposer


def grid() -> dict[str, ProposerFactory]:
    out: dict[str, ProposerFactory] = {}
    for lo, hi in ((1, 3), (1, 4), (2, 4), (2, 6), (3, 6)):
        out[f"ngram min_n={lo} max_n={hi}"] = functools.partial(NgramProposer, lo, hi)
    for threshold, factor, prior in itertools.product((0.05, 0.1, 0.2, 0.4), (2.0, 4.0, 8.0),
                                                      ((1.0, 1.0), (2.0, 0.5), (4.0, 0.5))):
        out[f"suffix threshold={threshold} factor={factor} prior={prior}"] = functools.partial(
            SuffixProposer, threshold=threshold, factor=factor, prior=prior)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outputs", type=Path)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--per-position", type=float, default=0.05)
    args = ap.parse_args()
    pairs: dict[str, list[tuple[list[int], list[int]]]] = defaultdict(list)
    for line in args.outputs.read_text().splitlines():
        rec = json.loads(line)
        pairs[rec["workload"]].append((rec["prompt"], rec["output"]))
    scores = []
    for name, make in grid().items():
        per = {w: replay_all(make, ps, args.k).speedup(args.per_position) for w, ps in pairs.items()}
        scores.append((sum(per.values()) / len(per), name, per))
    for mean, name, per in sorted(scores, reverse=True):
        print(f"{mean:.3f}  {name:<52} " + "  ".join(f"{w} {v:.2f}" for w, v in sorted(per.items())))


if __name__ == "__main__":
    main()
