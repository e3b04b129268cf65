"""Benchmarks: `magicdec bench` measures speculative against plain decoding and transformers' `generate`.

`grid.py` owns the grid and the runner (prefix prefill, interleaved repetitions, speedups); `peers.py`
the Hugging Face transformers peers; `report.py` the JSON lines, markdown table and plots. The command
line is `magicdec.cli.bench`; docs/benchmarks.md says what is measured and how to regenerate it.
"""

from magicdec.bench.grid import QUICK, BenchConfig, Grid, PrefixPrefill, Runner, parse_count, parse_gamma
from magicdec.bench.report import markdown, read_jsonl, write_report

__all__ = ["QUICK", "BenchConfig", "Grid", "PrefixPrefill", "Runner", "markdown", "parse_count", "parse_gamma",
           "read_jsonl", "write_report"]
