"""GPU check of `gamma=auto`: profile the device, then auto against plain decoding and every fixed γ.

    python benchmarks/gpu_auto_check.py [--quick] [--dry-run] [--out DIR]   # files go to $OUT (or --out)

1. Profile, as `magicdec profile` does: T_T, T_V(γ), T_D and whole rounds of the Llama-3.1-8B shape
   (random weights, bf16) at a few (batch, context) points, fitted from the device's built-in datasheet
   profile; saved as profile.json.
2. At each check point (batch, context, synthetic acceptance α): plain decoding, γ = 1…4, auto with the
   fitted profile, auto with the built-in datasheet profile, and (a diagnostic) plain steps taken through
   the speculative loop as auto's γ = 0 takes them, each decoding 64 new tokens per sequence
   on a copy of the same random KV cache (step costs do not depend on its values), in 5 interleaved
   repetitions after one warm-up (each repetition starts one configuration later, as `magicdec bench`).
   Records go to results.jsonl in the form `benchmarks/pivot.py --auto-check` reads (the datasheet auto
   under engine "magicdec-datasheet"); the auto checks print at the end.
Every section records its own errors and the script goes on; it stops starting check points after
DEADLINE_S so that one call stays under 7 minutes on an H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pivot import auto_check  # noqa: E402

from magicdec import LLM, Auto, SpecConfig  # noqa: E402
from magicdec.bench.compare import decode_timed  # noqa: E402
from magicdec.bench.fit import fit_profile, relative_errors  # noqa: E402
from magicdec.bench.grid import PLAIN, summarize  # noqa: E402
from magicdec.bench.profile import measure_point, random_batch  # noqa: E402
from magicdec.bench.report import JsonlWriter, git_commit, machine  # noqa: E402
from magicdec.bench.synthetic import synthetic_verifier  # noqa: E402
from magicdec.cache.memory import OutOfMemoryPlan  # noqa: E402
from magicdec.costmodel import DraftSpec, resolve_model, save_profile  # noqa: E402
from magicdec.costmodel.device import builtin_profile_name, device_name  # noqa: E402
from magicdec.costmodel.hardware import BUILTIN_PROFILES  # noqa: E402
from magicdec.costmodel.policy import FixedGamma  # noqa: E402
from magicdec.engine.outputs import GenerationResult  # noqa: E402
from magicdec.loading.random_init import random_loaded_model  # noqa: E402

BUDGET, SINKS, GAMMAS, MAX_GAMMA = 512, 16, [1, 2, 3, 4], 8
# (batch, context) for the profile, and (batch, context, α) to check: every point holds 128K tokens of
# KV cache (17 GB for the 8B shape; twice that with the working copy decodes run on)
GPU = {"profile": [(1, 16384), (8, 16384), (32, 4096), (64, 2048)], "profile_gammas": [1, 2, 4],
       "check": [(4, 32768, 0.8), (16, 8192, 0.8), (64, 2048, 0.6), (128, 1024, 0.5)],
       "new_tokens": 64, "repeats": 5}
DRY = {"profile": [(1, 1024), (4, 1024)], "profile_gammas": [1, 2], "check": [(2, 1024, 0.8), (4, 768, 0.5)],
       "new_tokens": 16, "repeats": 2}
DEADLINE_S = 330  # no new check point after this many seconds
# the engine of each configuration's records: auto with the datasheet profile, and a diagnostic (plain steps
# only, taken through the speculative loop with a drafter alongside, as auto's γ = 0) that pivot.py skips
AUTO_DATASHEET, SPEC_PATH_PLAIN = "auto-datasheet", "plain-steps"
ENGINES = {AUTO_DATASHEET: "magicdec-datasheet", SPEC_PATH_PLAIN: "magicdec-diagnostic"}
START = time.time()
RESULT: dict[str, Any] = {"errors": []}


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f} s] {msg}", flush=True)


def fail(section: str, e: BaseException) -> None:
    RESULT["errors"].append({"section": section, "error": repr(e), "trace": traceback.format_exc()[-3000:]})
    log(f"{section} FAILED: {e!r}")


def free(llm: LLM) -> None:
    llm.release_graphs()
    gc.collect()
    if llm.device.type == "cuda":
        torch.cuda.empty_cache()


def profile(llm: LLM, grid: dict[str, Any], out: Path) -> str:
    """Measure, fit and save the profile; returns what SpecConfig.profile should name."""
    gammas = grid["profile_gammas"]
    spec = SpecConfig(method="self", budget=BUDGET, sinks=SINKS, gamma=max(gammas))
    records: list[dict[str, Any]] = []
    for b, c in grid["profile"]:
        try:
            records += list(measure_point(llm, b, c, gammas, spec))
        except (OutOfMemoryPlan, torch.OutOfMemoryError) as e:
            fail(f"profile {b}x{c}", e)
        free(llm)
        log(f"profiled B={b} ctx={c}")
    dt = llm.dtype.itemsize
    draft = DraftSpec("self", BUDGET)
    fitted = fit_profile(records, BUILTIN_PROFILES[builtin_profile_name(llm.device)], target=llm.config, draft=draft,
                         dtype_bytes=dt, name=device_name(llm.device),
                         source=f"measured by benchmarks/gpu_auto_check.py on {device_name(llm.device)}")
    errors = relative_errors(records, fitted, target=llm.config, draft=draft, dtype_bytes=dt)
    path = save_profile(fitted, out / "profile.json")
    RESULT["profile"] = {"fitted": fitted.to_dict(), "measurements": records, "relative_errors": errors}
    log(f"fitted {fitted.mem_bandwidth / 1e12:.2f} TB/s, step {fitted.step_overhead_s * 1e3:.3f} ms, "
        f"round {fitted.round_overhead_s * 1e3:.3f} ms; errors {[round(e, 3) for e in errors]}")
    return str(path)


def check_point(llm: LLM, batch: int, context: int, alpha: float, fitted: str, grid: dict[str, Any],
                writer: JsonlWriter) -> None:
    def spec(gamma: int | Auto) -> SpecConfig:
        return SpecConfig(method="self", budget=BUDGET, sinks=SINKS, gamma=gamma)

    # (name, configuration): names are the records' labels; both autos share a SpecConfig label
    configs = [("plain", PLAIN), *((spec(g).label, spec(g)) for g in GAMMAS),
               (spec(Auto(MAX_GAMMA)).label, spec(Auto(MAX_GAMMA, fitted))),
               (AUTO_DATASHEET, spec(Auto(MAX_GAMMA, builtin_profile_name(llm.device)))),
               (SPEC_PATH_PLAIN, spec(1))]
    synthetic = synthetic_verifier(alpha)  # every spec config accepts each draft with probability α
    pre = random_batch(llm, batch, context, grid["new_tokens"], MAX_GAMMA)
    work = None  # one working copy of the cache (CUDA graphs keep its buffers)
    runs: dict[str, list[GenerationResult]] = {name: [] for name, _ in configs}
    for rnd in range(1 + grid["repeats"]):  # round 0 warms up (captures every shape a config meets)
        shift = rnd % len(configs)
        for name, s in configs[shift:] + configs[:shift]:
            copy = pre.fork(into=work)
            work = copy.cache
            policy = FixedGamma(0) if name == SPEC_PATH_PLAIN else None  # plain steps through the speculative loop
            result = decode_timed(llm, copy, s, synthetic if s.enabled else None, gamma_policy=policy)
            if rnd:
                runs[name].append(result)
    point = {"type": "point", "batch": batch, "context": context, "prefill_s": None,
             "max_new_tokens": grid["new_tokens"], "repeats": grid["repeats"], "synthetic": True,
             "synthetic_acceptance": alpha}
    for name, s in configs:
        rec = point | summarize(s, runs[name], runs["plain"], alpha)
        rec["config"] = name if name in ENGINES else rec["config"]
        rec["engine"] = ENGINES.get(name, "magicdec")
        rec["graph_capture_s"] = sum(r.stats.extra.get("graph_capture_s", 0.0) for r in runs[name])
        writer.write(rec)
        RESULT.setdefault("records", []).append(rec)
        log(f"  {name:<30} {rec['tokens_per_s']:9.1f} tok/s  speedup {rec.get('speedup', 1.0):.3f}  "
            f"γ rounds {rec.get('gamma_counts', '')}")
    del pre, work, copy
    free(llm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output directory (default: $OUT, else results/gpu-auto-check)")
    ap.add_argument("--dry-run", action="store_true", help="the script on the CPU with a small model")
    ap.add_argument("--quick", action="store_true", help="two profile points; only the points where plain is best")
    args = ap.parse_args()
    out = Path(args.out or os.environ.get("OUT") or "results/gpu-auto-check")
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_auto_check needs a CUDA device (or --dry-run)")
    dev, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    grid = DRY if args.dry_run else GPU
    if args.quick:
        grid = grid | {"profile": grid["profile"][:2], "check": grid["check"][2:]}
    cfg = resolve_model("llama-3.1-8b") if not args.dry_run else resolve_model("smollm2-135m").with_(n_layers=4)
    llm = LLM(loaded=random_loaded_model(cfg, dev, dtype, seed=0))
    RESULT["machine"] = machine(llm.device)
    RESULT["grid"] = grid
    log(f"model {cfg.name} on {RESULT['machine'].get('gpu', dev)}")
    save = lambda: (out / "gpu_auto_check.json").write_text(json.dumps(RESULT, indent=1))  # noqa: E731
    try:
        fitted = profile(llm, grid, out)
    except Exception as e:  # auto still runs, on the datasheet profile
        fail("profile", e)
        fitted = builtin_profile_name(llm.device)
    save()
    writer = JsonlWriter(out / "results.jsonl")
    writer.write({"type": "header", "command": "python benchmarks/gpu_auto_check.py", "machine": RESULT["machine"],
                  "magicdec_commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for batch, context, alpha in grid["check"]:
        if time.time() - START > DEADLINE_S:
            RESULT["errors"].append({"section": "check", "error": f"deadline: skipped ({batch}, {context}) and later"})
            break
        log(f"check B={batch} ctx={context} α={alpha}")
        try:
            check_point(llm, batch, context, alpha, fitted, grid, writer)
        except Exception as e:
            fail(f"check {batch}x{context}", e)
            free(llm)
        save()
    writer.close()
    recs = RESULT.get("records", [])
    for name in ("magicdec", "magicdec-datasheet"):
        chosen = [r | {"gamma": "auto"} if r["engine"] != "magicdec" else r for r in recs
                  if r["engine"] == name or (r["engine"] == "magicdec" and r["gamma"] != "auto")]
        if chosen:
            table = auto_check(chosen)
            RESULT[f"auto_check/{name}"] = table
            print(f"\nauto with the {'fitted' if name == 'magicdec' else 'datasheet'} profile:\n{table}", flush=True)
    RESULT["total_s"] = time.time() - START
    save()
    log(f"done; errors: {len(RESULT['errors'])}")
    for e in RESULT["errors"]:
        print(e["section"], e["error"], e.get("trace", "")[-1500:], flush=True)


if __name__ == "__main__":
    main()
