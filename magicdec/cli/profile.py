"""`magicdec profile`: measure T_T, T_V(γ), T_D and whole rounds on this device and model, fit the
hardware profile's parameters, and save it where `--gamma auto` and `plan` find it.

    magicdec profile                                 # built-in model, default grid for the device
    magicdec profile --batch 1 8 --context 2k 8k --gamma 1 2 4 --out my-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from magicdec.bench.fit import fit_profile, relative_errors
from magicdec.bench.profile import measure
from magicdec.cli.args import parse_count, parse_size
from magicdec.costmodel import save_profile
from magicdec.costmodel.device import device_name, device_profile, saved_profile_path
from magicdec.costmodel.steps import draft_spec
from magicdec.llm import LLM
from magicdec.loading import resolve_device
from magicdec.spec.config import DRAFTERS, Auto, SpecConfig

CPU_GRID = {"batch": [1, 4, 16], "context": [1024, 4096, 8192], "gamma": [1, 2, 4]}
GPU_GRID = {"batch": [1, 8, 32, 128], "context": [4096, 16384, 32768], "gamma": [1, 2, 4]}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("profile", help="measure step times on this device and fit a hardware profile",
                              description="Measure T_T, T_V(gamma), T_D and rounds; fit and save a profile.")
    p.add_argument("--model", help="Hugging Face directory or .gguf (default: built-in SmolLM2-135M)")
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--memory-budget", type=parse_size)
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default depends on the device)")
    p.add_argument("--context", type=parse_count, nargs="+", help="contexts, e.g. 1k 4k 8k")
    p.add_argument("--gamma", type=int, nargs="+", help="γ values for verification and rounds")
    p.add_argument("--drafter", choices=DRAFTERS, default="streaming")
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--draft-model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base", help="built-in profile to start the fit from (default: this device's)")
    p.add_argument("--out", help="where to save the profile JSON (default: where --gamma auto looks)")
    p.add_argument("--json", action="store_true", help="print the measurements and the profile as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    grid = GPU_GRID if resolve_device(args.device).type == "cuda" else CPU_GRID
    batches, contexts = args.batch or grid["batch"], args.context or grid["context"]
    gammas = args.gamma or grid["gamma"]
    method = "draft" if args.draft_model else "self"
    spec = SpecConfig(method=method, drafter=args.drafter, budget=args.budget, sinks=args.sinks,
                      draft_model=args.draft_model, gamma=Auto(max(gammas)))  # checked before the model loads
    llm = LLM(args.model, dtype=args.dtype, device=args.device, memory_budget=args.memory_budget)
    log = sys.stderr
    records = []
    def skip(message: str) -> None:
        print(f"skip {message}", file=log)

    for rec in measure(llm, batches, contexts, gammas, spec, args.repeats, on_skip=skip):
        records.append(rec)
        print(f"  {rec['kind']:>6} B={rec['batch']:<4} ctx={rec['context']:<6} γ={rec['gamma']} "
              f"{rec['seconds'] * 1e3:9.2f} ms", file=log, flush=True)
    draft = draft_spec(spec, llm.draft_model(spec.draft_model)[0].config if spec.draft_model else None)
    base = device_profile(llm.device, llm.config, llm.dtype) if not args.base else _builtin(args.base)
    name = device_name(llm.device)
    profile = fit_profile(records, base, target=llm.config, draft=draft, dtype_bytes=llm.dtype.itemsize, name=name,
                          source=f"measured by magicdec profile on {name} with {llm.config.name}")
    errors = relative_errors(records, profile, target=llm.config, draft=draft, dtype_bytes=llm.dtype.itemsize)
    out = args.out or saved_profile_path(llm.device, llm.config, llm.dtype)
    save_profile(profile, out)
    if args.json:
        print(json.dumps({"profile": profile.to_dict(), "measurements": records, "relative_errors": errors}))
        return 0
    print(f"{'kind':>6} {'batch':>5} {'context':>7} {'γ':>2} {'measured ms':>12} {'model ms':>9} {'error':>7}")
    for rec, err in zip(records, errors):
        ms = rec["seconds"] * 1e3
        print(f"{rec['kind']:>6} {rec['batch']:>5} {rec['context']:>7} {rec['gamma']:>2} {ms:12.2f} "
              f"{ms * (1 + err):9.2f} {err:+7.1%}")
    print(f"\nfitted: bandwidth {profile.mem_bandwidth / 1e9:.1f} GB/s, {profile.flops_fp32 / 1e9:.0f} GFLOP/s fp32, "
          f"step {profile.step_overhead_s * 1e3:.2f} ms, layer {profile.layer_overhead_s * 1e6:.0f} us, "
          f"round {profile.round_overhead_s * 1e3:.2f} ms")
    print(f"saved to {out}")
    return 0


def _builtin(name: str) -> Any:
    from magicdec.costmodel import load_profile

    return load_profile(name)
