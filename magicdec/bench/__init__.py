"""Measurement above the engine: `magicdec bench` (speculative against plain decoding and transformers'
`generate`), `--compare`, step-time profiling for `magicdec profile`, and the γ-policy simulator.

`grid.py` owns the grid and the runner (prefix prefill, interleaved repetitions, speedups); `compare.py`
one batch decoded both ways and the steady-state clock; `profile.py` step times on random KV; `peers.py`
the Hugging Face transformers peers; `report.py` the JSON lines, markdown table and plots; `policy_sim.py`
replays a γ policy against given step times. The command lines are in `magicdec.cli`.
Import the module you need (`from magicdec.bench.grid import Grid`): nothing is imported eagerly, so that
one benchmark's dependencies never load with another's.
"""
