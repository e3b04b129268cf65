"""Replay `--gamma auto` against step times measured by `magicdec bench`, free of run-to-run noise.

From a bench results.jsonl with fixed-γ records, each (batch, context) point gives the measured plain step,
draft step, verification at each γ and round bookkeeping, and the acceptance rate at γ = 1. The policy the
engine would build (the cost model with this machine's saved profile) then decodes the same number of
tokens in simulation (magicdec.bench.policy_sim), next to every fixed γ, over many seeds; machine noise is
simulated (per-step and drifting), so the comparison shows what the policy itself costs.

    python benchmarks/autogamma_sim.py benchmarks/results/cpu_auto_v3.jsonl \
        [--profile benchmarks/results/cpu_profile_v3.json] [--runs 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from magicdec.bench.policy_sim import StepTimes, compare, model_scale
from magicdec.bench.report import read_jsonl
from magicdec.costmodel import CostModel, DraftSpec, HardwareProfile, load_profile, resolve_model
from magicdec.costmodel.device import device_name, saved_profile_path
from magicdec.costmodel.policy import AutoGamma


def step_times(records: list[dict[str, Any]]) -> dict[tuple[int, int], tuple[StepTimes, float]]:
    """Per (batch, context): the measured step times, and α (accepted drafts per round at γ = 1)."""
    plain = {(r["batch"], r["context"]): r for r in records if r.get("config") == "plain"}
    fixed = [r for r in records if r.get("engine") == "magicdec" and isinstance(r.get("gamma"), int)
             and r.get("mean_accepted_tokens")]
    out = {}
    for key, p in plain.items():
        rows = [r for r in fixed if (r["batch"], r["context"]) == key]
        if not rows:
            continue
        batch = key[0]
        draft, verify, rest, alpha = [], {}, [], None
        for r in rows:
            g, rounds = r["gamma"], r["decode_tokens"] / batch / r["mean_accepted_tokens"]
            draft.append(r["draft_s"] / rounds / g)
            verify[g] = r["verify_s"] / rounds
            rest.append(max(r["decode_s"] / rounds - r["draft_s"] / rounds - verify[g], 0.0))
            if g == 1:
                alpha = r["mean_accepted_tokens"] - 1
        target = p["decode_s"] / (p["decode_tokens"] / batch)
        times = StepTimes(target, statistics.median(draft), verify, statistics.median(rest))
        out[key] = (times, min(alpha if alpha is not None else 0.8, 0.99))
    return out


def saved_cpu_profile() -> Path:
    import torch

    cpu = torch.device("cpu")
    folder = saved_profile_path(cpu, resolve_model("smollm2-135m"), torch.float32).parent
    saved = sorted(folder.glob(f"{device_name(cpu)}--*--float32.json"))  # whatever the model's own name
    if not saved:
        raise SystemExit("no saved CPU profile: run `magicdec profile` first, or pass --profile")
    return saved[0]


def read_profile(path: str) -> HardwareProfile:
    """A profile JSON, or the record `magicdec profile --json` prints (the profile under "profile")."""
    if Path(path).is_file():
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and isinstance(data.get("profile"), dict):
            return HardwareProfile.from_dict(data["profile"])
    return load_profile(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--profile", help="hardware profile JSON, or a `magicdec profile --json` record (default: the "
                    "one `magicdec profile` saved for this CPU and float32, as the engine would use)")
    ap.add_argument("--model", default="smollm2-135m", help="model shape name or config.json")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    header, records = read_jsonl(args.results)
    new_tokens = header["options"]["max_new_tokens"]
    cfg = resolve_model(args.model)
    profile = read_profile(args.profile) if args.profile else load_profile(saved_cpu_profile())
    cost = CostModel(cfg, profile, DraftSpec("self", args.budget), dtype_bytes=4)
    print(f"profile: {profile.name}; {args.runs} simulated runs of {new_tokens} tokens per point\n")
    print("| batch | context | α (γ=1) | " + " | ".join(f"γ={g}" for g in range(5)) + " | auto | auto / best |")
    print("|---|---|---|" + "---|" * 7)
    for (batch, context), (times, alpha) in sorted(step_times(records).items()):
        tps = compare(lambda: AutoGamma(cost, 8), times, batch, context, new_tokens,
                      alpha, range(0, max(times.verify) + 1), runs=args.runs,
                      scale=model_scale(cost, batch, context))
        best = max(v for k, v in tps.items() if k != "auto")
        cells = " | ".join(f"{tps[str(g)] / tps['0']:.3f}" if str(g) in tps else "" for g in range(5))
        print(f"| {batch} | {context} | {alpha:.2f} | {cells} | {tps['auto'] / tps['0']:.3f} | "
              f"{tps['auto'] / best:.3f} |")


if __name__ == "__main__":
    main()
