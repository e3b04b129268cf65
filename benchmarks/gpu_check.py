"""GPU check: correctness and step times on one GPU, through the engine, in one call (< 4 minutes on an H100).

    python benchmarks/gpu_check.py [--quick] [--out DIR]      # JSON goes to $OUT (or --out) if set
    python benchmarks/gpu_check.py --dry-run                  # the script itself, on the CPU, small shapes

Everything runs on the one engine core (`EngineConfig(cuda_graphs=True)` on CUDA: the paged KV cache, the
paged attention kernel, decode-shaped forwards replayed as CUDA graphs).
1. Correctness: GPU bf16 logits against a CPU float32 reference on a small random config over the paged
   cache (prefill chunk through SDPA, decode and verification blocks through the paged Triton kernel);
   greedy identity of speculative and plain decoding through the engine on small random models (self
   StreamingLLM, SnapKV, draft model).
2. Step times for the Llama-3.1-8B shape with random weights, over random-KV requests
   (`magicdec.bench.profile`): T_T = one whole plain engine step (graph replay, sampling, bookkeeping),
   T_V(γ = 1..4) and T_D the engine's verification and draft forwards, for self speculation over a
   StreamingLLM-512 view and for a Llama-3.2-1B-shaped draft model with a 512 budget (its own paged pool),
   each against the bandwidth bound (weights + KV bytes over the measured copy bandwidth; the target
   should be ≥ 90% of it wherever B × context ≥ 128K).
2b. Attention kernels alone, one layer of the Llama-3.1-8B shape at (8, 32K), T = 1 and 4: the dense
   split-KV kernel and the paged one (pages of 64 slots in shuffled order; with and without block scores),
   each against the bandwidth bound of its KV bytes, and the paged output against the dense one.
3. End to end through the engine: self-speculative throughput with synthetic acceptance 0.8 against plain
   decoding at (8, 32K) and (32, 8K) (random-KV requests, the steady state: every request decoding), next
   to the cost model's prediction from the measured step times and to the deleted static path's last
   figure (`STATIC_PATH`).
Every section records its own errors and the script goes on, so one failure does not lose the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig  # noqa: E402
from magicdec.bench.compare import compare  # noqa: E402
from magicdec.bench.profile import measure_point  # noqa: E402
from magicdec.bench.synthetic import synthetic_verifier  # noqa: E402
from magicdec.cache.paged import PagedKVCache, PagedView  # noqa: E402
from magicdec.config import ModelConfig  # noqa: E402
from magicdec.costmodel import omega, resolve_model  # noqa: E402
from magicdec.engine.outputs import RunStats  # noqa: E402
from magicdec.kernels import cpu as cpu_kernels  # noqa: E402
from magicdec.loading.random_init import random_loaded_model, random_model  # noqa: E402

POINTS = [(1, 32768), (8, 32768), (16, 16384), (32, 8192), (64, 6144), (128, 3072), (256, 1536)]
E2E_POINTS = [(8, 32768), (32, 8192)]
GAMMAS = [1, 2, 3, 4]
BUDGET, SINKS = 512, 16
ALPHA = 0.8
PAGE = 64  # the engine's KV block
# the static path's last end-to-end speedups (steady state, synthetic α 0.8, self StreamingLLM-512) by γ, at
# commit 8e8f5a9 on an H100 (benchmarks/results/gpu_check_h100.json), before the engine replaced it
STATIC_PATH = {(8, 32768): {2: 1.316, 3: 1.286, 4: 1.256}, (32, 8192): {2: 1.308, 3: 1.233, 4: 1.220}}
DEADLINE_S = 215  # stop starting new timing points after this (the whole check must stay < 4 min)

RESULT: dict[str, Any] = {"errors": []}
START = time.time()
DEV = "cuda"  # --dry-run: "cpu", with small shapes, to check the script itself on a machine without a GPU


def out_dir(arg: str | None) -> Path | None:
    d = arg or os.environ.get("OUT")
    return Path(d) if d else None


def save(path: Path | None) -> None:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "gpu_check.json").write_text(json.dumps(RESULT, indent=1))


def section(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # keep going: one failing section must not lose the others
                RESULT["errors"].append({"section": name, "error": repr(e), "trace": traceback.format_exc()[-3000:]})
                print(f"[{name}] FAILED: {e!r}", flush=True)
            finally:
                print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
        return run
    return wrap


def device_time(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of fn(): CUDA events on the GPU, the host clock in a dry run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


@section("machine")
def machine() -> float:
    big = DEV == "cuda"
    x = torch.empty((2 << 30) if big else (256 << 20), dtype=torch.uint8, device=DEV).random_()
    y = torch.empty_like(x)
    copy_s = device_time(lambda: y.copy_(x), 2, 10)
    bw = 2 * x.numel() / copy_s  # bytes read + written
    n = 8192 if big else 1024
    dt = torch.bfloat16 if big else torch.float32
    a, b = torch.randn(n, n, device=DEV, dtype=dt), torch.randn(n, n, device=DEV, dtype=dt)
    mm_s = device_time(lambda: a @ b, 2, 10)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    RESULT["machine"] = {
        "gpu": torch.cuda.get_device_name() if big else "cpu (dry run)", "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(), "copy_bandwidth_tb_s": bw / 1e12,
        "matmul_tflops": 2 * n**3 / mm_s / 1e12, "matmul_dtype": str(dt),
    }
    print(json.dumps(RESULT["machine"]), flush=True)
    return bw


SMALL = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, n_layers=4, n_heads=8, n_kv_heads=2,
                    max_position_embeddings=4096, name="small")
SMALL_DRAFT = SMALL.with_(n_layers=2, hidden_size=128, intermediate_size=256, n_heads=4, n_kv_heads=1, name="draft")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@section("logits_vs_cpu")
def logits_vs_cpu() -> None:
    cpu = random_model(SMALL, "cpu", torch.float32, seed=1)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    gpu = random_model(SMALL, DEV, dt, seed=1)
    gpu.load_state_dict({k: v.to(DEV, dt) for k, v in cpu.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    B, P = 3, 300
    ids = torch.randint(0, SMALL.vocab_size, (B, P + 12), generator=g)
    res = {}
    for dev, model in (("cpu", cpu), (DEV, gpu)):
        nb = -(-(P + 16) // PAGE)  # each row's blocks, in a shuffled pool as the engine's
        cache = PagedKVCache.for_model(model, B * nb, PAGE)
        order = torch.randperm(B * nb, generator=torch.Generator().manual_seed(1)).view(B, nb).tolist()
        view = PagedView(cache, cache.table(order))
        x = ids.to(dev)
        pos = torch.arange(P + 12, device=dev).expand(B, -1)
        with torch.inference_mode():
            pre = model(x[:, :P], pos[:, :P], view)[:, -1]  # a prefill chunk: SDPA
            dec = [model(x[:, P + i : P + i + 1], pos[:, P + i : P + i + 1], view)[:, 0] for i in range(8)]
            ver = model(x[:, P + 8 : P + 12], pos[:, P + 8 : P + 12], view)  # a verify block: T = 4
        res["gpu" if model is gpu else "cpu"] = (pre, torch.stack(dec, 1), ver)
    errs = {name: rel(res["gpu"][i], res["cpu"][i]) for i, name in enumerate(("prefill", "decode", "verify"))}
    RESULT["logits_vs_cpu"] = {"relative_error": errs, "pass": all(e < 3e-2 for e in errs.values())}
    print("logits vs CPU fp32:", errs, flush=True)


@section("greedy_identity")
def greedy_identity() -> None:
    out = {}
    for dtype in (torch.bfloat16, torch.float32) if DEV == "cuda" else (torch.float32,):
        llm = LLM(loaded=random_loaded_model(SMALL, DEV, dtype, seed=2))
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, SMALL.vocab_size, (n,), generator=g).tolist() for n in (700, 90, 333, 41)]
        params = SamplingParams(max_new_tokens=48, ignore_eos=True)
        # a random draft model under a name LLM.draft_model finds already loaded (no checkpoint on disk)
        draft = random_loaded_model(SMALL_DRAFT, DEV, dtype, seed=4)
        llm.add_draft_model("random-draft", draft)
        specs = {
            "self-streaming": SpecConfig(method="self", budget=64, sinks=4, gamma=3),
            "self-snapkv": SpecConfig(method="self", drafter="snapkv", budget=64, gamma=3,
                                      tuning=DraftTuning(snapkv_window=16)),
            "draft-model": SpecConfig(method="draft", draft_model="random-draft", drafter="streaming", budget=64,
                                      sinks=4, gamma=3),
        }
        for name, spec in specs.items():
            c = compare(llm, prompts, params, spec)
            out[f"{name}/{str(dtype)[6:]}"] = {"matches_plain": c.matches_plain,
                                              "acceptance": c.result.stats.acceptance_rate}
    RESULT["greedy_identity"] = out
    print("greedy identity:", out, flush=True)


def kv_bytes(cfg: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    return cfg.kv_bytes_per_token(dtype.itemsize) * tokens


def shapes() -> tuple[ModelConfig, ModelConfig, list[tuple[int, int]], list[tuple[int, int]], torch.dtype]:
    """Target and draft shapes, timing points, end-to-end points, dtype (small ones in a dry run)."""
    if DEV == "cuda":
        return resolve_model("llama-3.1-8b"), resolve_model("llama-3.2-1b"), POINTS, E2E_POINTS, torch.bfloat16
    small = resolve_model("smollm2-135m")
    return small, small.with_(n_layers=4), [(2, 1024), (1, 2048)], [(2, 1024)], torch.float32


def cuda_graphs() -> bool | None:
    """The engine's CUDA graphs: on for the GPU check (a dry run: the CPU's default, none)."""
    return True if DEV == "cuda" else None


@section("step_times")
def step_times(bw: float, quick: bool) -> None:
    target_cfg, draft_cfg, points, _, dt = shapes()
    llm = LLM(loaded=random_loaded_model(target_cfg, DEV, dt, seed=0))
    llm.add_draft_model("random-1b", random_loaded_model(draft_cfg, DEV, dt, seed=1))
    rows: list[dict[str, Any]] = []
    RESULT["step_times"] = rows
    for B, ctx in points[:3] if quick else points:
        if time.time() - START > DEADLINE_S:
            RESULT["errors"].append({"section": "step_times", "error": f"deadline: skipped ({B}, {ctx}) and later"})
            break
        rows.append(time_point(llm, draft_cfg, B, ctx, bw, dt))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
        empty_cache()


def time_point(llm: LLM, draft_cfg: ModelConfig, B: int, ctx: int, bw: float, dt: torch.dtype) -> dict[str, Any]:
    """T_T, T_V(γ) and both T_D at one (batch, context) through the engine, each against its bandwidth bound."""
    cfg = llm.config
    self_spec = SpecConfig(method="self", budget=BUDGET, sinks=SINKS, gamma=max(GAMMAS))
    ms = {(r["kind"], r["gamma"]): r["seconds"] * 1e3
          for r in measure_point(llm, B, ctx, GAMMAS, self_spec, repeats=10, steps=4,
                                 kinds=("target", "verify", "draft"), cuda_graphs=cuda_graphs())}
    empty_cache()  # the target's pool is gone before the draft model's core is made
    draft_spec = SpecConfig(method="draft", draft_model="random-1b", budget=BUDGET, sinks=SINKS, gamma=1)
    ms_1b = next(r["seconds"] * 1e3 for r in measure_point(llm, B, ctx, [1], draft_spec, repeats=10,
                                                           kinds=("draft",), cuda_graphs=cuda_graphs()))
    row: dict[str, Any] = {"batch": B, "context": ctx, "t_target_ms": ms["target", 0],
                           **{f"t_verify_{g}_ms": ms["verify", g] for g in GAMMAS}}
    row["bound_target_ms"] = (cfg.weight_bytes(dt.itemsize) + kv_bytes(cfg, B * ctx, dt)) / bw * 1e3
    row["target_fraction_of_bound"] = row["bound_target_ms"] / row["t_target_ms"]
    for name, c, t in (("self", cfg, ms["draft", 0]), ("1b", draft_cfg, ms_1b)):
        row[f"t_draft_{name}_ms"] = t
        row[f"bound_draft_{name}_ms"] = (c.weight_bytes(dt.itemsize) + kv_bytes(c, B * min(BUDGET, ctx), dt)) / bw * 1e3
    tt = row["t_target_ms"]
    row["verify3_over_target"] = row["t_verify_3_ms"] / tt
    row["draft_self_over_target"] = row["t_draft_self_ms"] / tt
    row["draft_1b_over_target"] = row["t_draft_1b_ms"] / tt
    return row


ATTENTION_POINTS = [(8, 32768)]  # batch × context ≥ 128K: the KV read dominates the launch


@section("attention_kernels")
def attention_kernels(bw: float) -> None:
    """One layer's decode attention, dense cache against paged pool (same keys, shuffled pages): time and
    fraction of the bandwidth bound (K and V bytes over the copy bandwidth). The dry run times the CPU
    kernels (or their fallbacks) on small shapes instead: it checks the script, not the Triton kernels."""
    cfg, _, _, _, dt = shapes()
    Hq, Hkv, D, P = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 64
    if DEV == "cuda":
        from magicdec.kernels.decode_attention import decode_attention
        from magicdec.kernels.paged_attention import paged_attention

        def dense(q, k, v, qpos, allowed):
            return decode_attention(q, k, v, qpos)

        def paged(q, kp, vp, table, qpos, allowed, scores):
            return paged_attention(q, kp, vp, table, qpos, block_scores=scores)
        points = ATTENTION_POINTS
    else:
        def dense(q, k, v, qpos, allowed):
            return cpu_kernels.attention(q, k, v, allowed)

        def paged(q, kp, vp, table, qpos, allowed, scores):
            return cpu_kernels.paged_attention(q, kp, vp, table, allowed, block_scores=scores)
        points = [(2, 1024)]
    rows: list[dict[str, Any]] = []
    RESULT["attention_kernels"] = rows
    for B, ctx in points:
        for row in attention_point(B, ctx, Hq, Hkv, D, P, dt, bw, dense, paged):
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        empty_cache()


def attention_point(B: int, ctx: int, Hq: int, Hkv: int, D: int, P: int, dt: torch.dtype, bw: float, dense: Any,
                    paged: Any) -> list[dict[str, Any]]:
    nb = ctx // P
    k = torch.randn(B, Hkv, ctx, D, device=DEV, dtype=dt)
    v = torch.randn_like(k)
    # the same keys in a pool of B·nb pages (+ 1 trash page) in shuffled order
    table = torch.randperm(B * nb, device=DEV).view(B, nb)
    kp = torch.empty(B * nb + 1, Hkv, P, D, device=DEV, dtype=dt)
    vp = torch.empty_like(kp)
    kp[table.reshape(-1)] = k.view(B, Hkv, nb, P, D).transpose(1, 2).reshape(B * nb, Hkv, P, D)
    vp[table.reshape(-1)] = v.view(B, Hkv, nb, P, D).transpose(1, 2).reshape(B * nb, Hkv, P, D)
    bound = 2 * B * Hkv * ctx * D * dt.itemsize / bw
    rows = []
    for T in (1, 4):
        q = torch.randn(B, T, Hq, D, device=DEV, dtype=dt).transpose(1, 2)  # the projection's layout
        qpos = (ctx - T + torch.arange(T, device=DEV)).expand(B, -1).to(torch.int32).contiguous()
        allowed = torch.ones(B, T, ctx, dtype=torch.bool, device=DEV).tril(ctx - T)
        scores = torch.zeros(B, nb, dtype=torch.float32, device=DEV)
        want = dense(q, k, v, qpos, allowed)
        got = paged(q, kp, vp, table, qpos, allowed, scores)
        want_scores = cpu_kernels.block_scores_reference(q, k, allowed, P)  # float64 on the gathered keys

        def run_dense(q=q, qpos=qpos, allowed=allowed):
            return dense(q, k, v, qpos, allowed)

        def run_paged(q=q, qpos=qpos, allowed=allowed, scores=None):
            return paged(q, kp, vp, table, qpos, allowed, scores)

        t_dense = device_time(run_dense, 3, 20)
        t_paged = device_time(run_paged, 3, 20)
        t_scores = device_time(lambda run=run_paged, s=scores: run(scores=s), 3, 20)
        rows.append({"batch": B, "context": ctx, "T": T, "bound_us": bound * 1e6,
                     "dense_us": t_dense * 1e6, "dense_fraction_of_bound": bound / t_dense,
                     "paged_us": t_paged * 1e6, "paged_fraction_of_bound": bound / t_paged,
                     "paged_scores_us": t_scores * 1e6, "paged_scores_fraction_of_bound": bound / t_scores,
                     "paged_vs_dense_relative_error": rel(got, want),
                     "block_scores_max_abs_error": float((scores - want_scores).abs().max()),
                     "block_scores_max": float(scores.max()), "block_scores_min": float(scores.min())})
    return rows


NEW_TOKENS = 64  # per request in an end-to-end run


@section("end_to_end")
def end_to_end(quick: bool) -> None:
    target_cfg, _, _, e2e_points, dt = shapes()
    empty_cache()
    llm = LLM(loaded=random_loaded_model(target_cfg, DEV, dt, seed=0))
    rows = []
    RESULT["end_to_end"] = rows
    steps = {(r["batch"], r["context"]): r for r in RESULT.get("step_times", [])}
    synthetic = synthetic_verifier(ALPHA)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for B, ctx in e2e_points[:1] if quick else e2e_points:
        res: dict[str, Any] = {"batch": B, "context": ctx, "alpha": ALPHA}
        ids = [[3 + i] * ctx for i in range(B)]  # random-KV requests: their prompts' KV is random, not prefilled
        core = llm.core_for(ids, params, SpecConfig(method="self", budget=BUDGET, sinks=SINKS, gamma=4),
                            enable_prefix_caching=False, cuda_graphs=cuda_graphs())

        def run(spec: SpecConfig | None, core: Any = core, ids: list[list[int]] = ids) -> RunStats:
            core.set_speculation(spec, verifier=synthetic if spec is not None else None)
            return llm.run(core, ids, params, random_kv=True).stats

        try:
            run(None)  # warm-up: compiles and captures the plain step
            for gamma in (2, 3, 4):
                spec = SpecConfig(method="self", budget=BUDGET, sinks=SINKS, gamma=gamma)
                run(spec)  # warm-up
                spec_s, plain_s = run(spec), run(None)
                spec_steady, plain_steady = (s.extra["steady_tokens_per_s"] for s in (spec_s, plain_s))
                measured = spec_steady / plain_steady
                rounds = spec_s.acceptance.rounds / B
                entry: dict[str, Any] = {
                    "speedup": measured, "speedup_all_tokens": plain_s.seconds_per_token / spec_s.seconds_per_token,
                    "static_path_speedup": STATIC_PATH.get((B, ctx), {}).get(gamma),
                    "acceptance": spec_s.acceptance_rate, "mean_accepted_tokens": spec_s.mean_accepted_tokens,
                    "spec_steady_tok_s": spec_steady, "plain_steady_tok_s": plain_steady,
                    "round_ms": spec_s.decode_s / rounds * 1e3, "draft_ms_per_round": spec_s.draft_s / rounds * 1e3,
                    "verify_ms_per_round": spec_s.verify_s / rounds * 1e3,
                    "plain_step_ms": plain_s.decode_s / (NEW_TOKENS - 1) * 1e3,
                    "graph_capture_s": core.graphs.capture_s}
                st = steps.get((B, ctx))
                if st:  # Eq. 1 with the measured step times and the measured tokens per round
                    tt, tv, td = st["t_target_ms"], st[f"t_verify_{gamma}_ms"], st["t_draft_self_ms"]
                    entry["predicted_from_step_times"] = spec_s.mean_accepted_tokens / ((gamma * td + tv) / tt)
                    entry["predicted_with_expected_omega"] = omega(gamma, ALPHA) / ((gamma * td + tv) / tt)
                    entry["error"] = measured / entry["predicted_with_expected_omega"] - 1
                    entry["error_with_measured_omega"] = measured / entry["predicted_from_step_times"] - 1
                res[f"gamma_{gamma}"] = entry
        finally:
            core.close()
        empty_cache()
        rows.append(res)
        print(json.dumps(res), flush=True)


@section("diagnostics")
def diagnostics(bw: float) -> None:
    """Where the time goes: linear layers of the 8B shape at growing row counts, and the GPU kernels of
    one eager decode step and one verification over the paged cache at (8, 32K), by total time."""
    target_cfg, _, _, _, dt = shapes()
    if DEV != "cuda":
        return
    d = target_cfg.hidden_size
    mats = {"qkv": (target_cfg.q_size + 2 * target_cfg.kv_size, d), "o": (d, target_cfg.q_size),
            "gate_up": (2 * target_cfg.intermediate_size, d), "down": (d, target_cfg.intermediate_size)}
    lin: dict[str, Any] = {}
    matmul = torch.backends.cuda.matmul
    for name, (n, k) in mats.items():
        w = torch.randn(n, k, device=DEV, dtype=dt)
        for m in (1, 8, 32, 256, 1280):
            x = torch.randn(m, k, device=DEV, dtype=dt)
            for reduced in (True, False):  # may cuBLAS reduce split-K partial sums in bf16?
                matmul.allow_bf16_reduced_precision_reduction = reduced
                t = device_time(lambda x=x, w=w: torch.nn.functional.linear(x, w), 3, 20)
                lin[f"{name}/M={m}/reduced={reduced}"] = {"us": t * 1e6, "fraction_of_bound": (n * k * 2 / bw) / t}
    matmul.allow_bf16_reduced_precision_reduction = True
    RESULT["diagnostics"] = {"linear": lin}
    model = random_model(target_cfg, DEV, dt, seed=0)
    from torch.profiler import ProfilerActivity, profile

    for B, ctx, T in ((8, 32768, 1), (8, 32768, 4), (256, 1536, 1)):
        nb = -(-(ctx + 8) // PAGE)
        cache = PagedKVCache.for_model(model, B * nb, PAGE)
        for buf in (cache.k, cache.v):
            buf.normal_(0, 0.5)  # random keys and values: step costs do not depend on them
        view = PagedView(cache, torch.randperm(B * nb, device=DEV).view(B, nb))
        ids = torch.randint(0, target_cfg.vocab_size, (B, T), device=DEV)
        pos = ctx + torch.arange(T, device=DEV).expand(B, -1)
        with torch.inference_mode():
            model(ids, pos, view)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(ids, pos, view)
                torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:14]
        key = f"B{B}_ctx{ctx}_T{T}"
        RESULT["diagnostics"][f"kernels_{key}"] = [
            {"name": e.key[:90], "calls": e.count, "total_us": e.device_time_total} for e in rows]
        RESULT["diagnostics"][f"kernel_sum_{key}_us"] = sum(e.device_time_total for e in prof.key_averages())
        del cache
        empty_cache()
    print(json.dumps(RESULT["diagnostics"])[:3000], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points (a smoke test)")
    ap.add_argument("--out", help="directory for gpu_check.json (default: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="run the script on the CPU with small shapes")
    args = ap.parse_args()
    path = out_dir(args.out)
    global DEV
    if args.dry_run:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device (or --dry-run)")
    bw = machine() or 3.0e12
    save(path)
    logits_vs_cpu()
    greedy_identity()
    save(path)
    attention_kernels(bw)
    save(path)
    step_times(bw, args.quick)
    save(path)
    end_to_end(args.quick)
    save(path)
    if not args.quick:
        diagnostics(bw)
    RESULT["total_s"] = time.time() - START
    save(path)
    print(f"done in {RESULT['total_s']:.0f} s; errors: {len(RESULT['errors'])}", flush=True)
    for e in RESULT["errors"]:
        print(e["section"], e["error"], e.get("trace", "")[-1500:], flush=True)


if __name__ == "__main__":
    main()
