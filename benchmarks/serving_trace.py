"""Serving on a request trace: `magicdec bench trace` as a script (same options; see docs/benchmarks.md).

    python benchmarks/serving_trace.py --requests 16 --prompt-len 4k-7k --output-len 32-128 --concurrency 8
    python benchmarks/serving_trace.py --rate 0.5 --configs plain self auto --gamma 2 3 --out results/trace-rate

Writes DIR/results.jsonl, DIR/results.md and DIR/trace.png (DIR: --out, default results/trace-<timestamp>);
the exit status is 1 when greedy outputs differ across the continuous-batching configurations or KV
blocks leak.
"""

from __future__ import annotations

import sys

from magicdec.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "trace", *sys.argv[1:]]))
