"""Times magicdec's batch-invariant CPU kernels against the PyTorch ops they replace, for SmolLM2-135M
decode shapes, and prints a table with the bandwidth achieved against a measured streaming-read bound.

    python benchmarks/cpu_kernels.py                     # everything (~2-4 minutes on 2 cores)
    python benchmarks/cpu_kernels.py --only linear --rounds 5

Linear layers: y = x Wᵀ for M = batch × tokens rows, on `--copies` distinct weights per shape (cycled,
so that the weights come from memory, not from cache, as in a real forward), against F.linear (MKL) and
oneDNN (`torch.ops.mkldnn._linear_pointwise`). Attention: GQA (9 query heads, 3 KV heads, D 64) of T
query tokens per sequence over S cached slots, against SDPA with the folded-GQA float mask that
magicdec.model.attention falls back to (q as [B, Hkv, g·T, D], mask [B, 1, g·T, S]); K and V are strided
views of a cache buffer with several layers (cycled, to defeat the L3 cache).

Timings are interleaved: each round times every implementation once, in turn; the table shows the
median over rounds (`--stat min`: the best round, closer to an idle machine) and the spread
(max/min - 1) of the kernel's and the baseline's times. The load average is printed before and after,
since another process on the machine skews the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from magicdec.kernels import cpu

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 576, 1536, 9, 3, 64, 49152, 30
# (name, N, K) of SmolLM2-135M's linear layers; the per-layer ones appear LAYERS times per step.
LINEARS = [("qkv", (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), ("o", HIDDEN, HEADS * HEAD_DIM),
           ("gate_up", 2 * INTER, HIDDEN), ("down", HIDDEN, INTER)]
LM_HEAD = ("lm_head", VOCAB, HIDDEN)
ATTENTION_CASES = [(8, 6144, 1), (8, 6144, 4), (8, 6144, 8), (1, 8192, 1), (1, 8192, 4), (16, 2048, 4)]
# Keep at least this many bytes of distinct operands in rotation so that they cannot stay in the 32 MiB L3.
ROTATION_BYTES = 128 << 20


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


STAT: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}


def stream_bandwidth(rounds: int, stat: Callable[[list[float]], float]) -> float:
    """Bytes/s of a multi-threaded read of a 256 MiB tensor (torch.sum): the streaming bound."""
    big = torch.ones(64 << 20)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t0)
    return big.numel() * 4 / stat(times)


class Rotation:
    """Calls fn(*args) for successive operand sets, one set per call, cycling (so that a timed call finds
    its operands in memory rather than in cache, as a forward through many layers does)."""

    def __init__(self, fn: Callable[..., object], operands: list[tuple]) -> None:
        self.fn, self.operands, self.i = fn, operands, 0

    def __len__(self) -> int:
        return len(self.operands)

    def __call__(self) -> object:
        self.i = (self.i + 1) % len(self.operands)
        return self.fn(*self.operands[self.i])


def interleaved(fns: dict[str, Rotation], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample (a full rotation) per round, the functions taking
    turns within each round."""
    for fn in fns.values():  # warm up (and build the kernels)
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(len(fn)):
                fn()
            samples[name].append((time.perf_counter() - t0) / len(fn))
    return samples


def spread(xs: list[float]) -> float:
    return max(xs) / min(xs) - 1


def onednn_available() -> bool:
    try:
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), torch.ones(3, 4), None, "none", [], "")
        return True
    except (AttributeError, RuntimeError):
        return False


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def bench_linear(ms: list[int], copies: int, rounds: int, bw: float, stat: Callable[[list[float]], float]) -> None:
    print(f"\n## Linear layers (ms per call, weight GB/s; {copies} distinct weights per shape, cycled)")
    header = f"{'shape':>18} {'M':>4} | {'kernel':>14} {'spread':>6} | {'F.linear (MKL)':>14} {'spread':>6} |" \
             f" {'oneDNN':>14} | {'vs MKL':>6} {'vs oneDNN':>9} | {'% stream':>8}"
    print(header)
    print("-" * len(header))
    use_onednn = onednn_available()
    step: dict[int, dict[str, float]] = {}
    for name, N, K in [*LINEARS, LM_HEAD]:
        n_copies = max(1, min(copies, math.ceil(ROTATION_BYTES / (N * K * 4)))) if name == "lm_head" else copies
        weights = [torch.randn(N, K) / math.sqrt(K) for _ in range(n_copies)]
        for M in ms:
            x = torch.randn(M, K)
            operands = [(x, w) for w in weights]
            fns = {"kernel": Rotation(cpu.linear, operands), "mkl": Rotation(F.linear, operands)}
            if use_onednn:
                fns["onednn"] = Rotation(onednn_linear, operands)
            samples = interleaved(fns, rounds)
            med = {k: stat(v) for k, v in samples.items()}
            gbs = {k: N * K * 4 / t / 1e9 for k, t in med.items()}
            times = LAYERS if name != "lm_head" else 1
            for k, t in med.items():
                step.setdefault(M, {}).setdefault(k, 0.0)
                step[M][k] += t * times
            one = med.get("onednn", float("nan"))
            print(f"{name + f' {N}x{K}':>18} {M:>4} | {med['kernel'] * 1e3:7.3f} {gbs['kernel']:5.1f}GB/s"
                  f" {spread(samples['kernel']) * 100:5.0f}% | {med['mkl'] * 1e3:7.3f} {gbs['mkl']:5.1f}GB/s"
                  f" {spread(samples['mkl']) * 100:5.0f}% |"
                  f" {one * 1e3:7.3f} {gbs.get('onednn', float('nan')):5.1f}GB/s |"
                  f" {med['mkl'] / med['kernel']:5.2f}x {one / med['kernel']:8.2f}x |"
                  f" {gbs['kernel'] * 1e9 / bw * 100:7.0f}%")
    weight_bytes = LAYERS * sum(N * K for _, N, K in LINEARS) * 4 + VOCAB * HIDDEN * 4
    print(f"\nAll linears of one step ({weight_bytes / 1e6:.0f} MB of weights; streaming bound "
          f"{weight_bytes / bw * 1e3:.1f} ms):")
    for M, by in step.items():
        print(f"  M={M:>3}: " + ", ".join(f"{k} {t * 1e3:6.1f} ms" for k, t in by.items()))


def causal_allowed(B: int, T: int, S: int) -> torch.Tensor:
    """[B, T, S]: the T queries are the last T positions of an S-slot causal cache."""
    pos = torch.arange(S - T, S)
    return (torch.arange(S)[None, :] <= pos[:, None]).expand(B, T, S).contiguous()


def sdpa_folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What magicdec.model.attention does for short blocks: GQA heads folded into the query rows."""
    B, Hq, T, D = q.shape
    qf = q.reshape(B, k.shape[1], (Hq // k.shape[1]) * T, D)
    return F.scaled_dot_product_attention(qf, k, v, attn_mask=bias).view(B, Hq, T, D)


def bench_attention(cases: list[tuple[int, int, int]], rounds: int, bw: float,
                    stat: Callable[[list[float]], float]) -> None:
    print("\n## Attention, Hq 9 / Hkv 3 / D 64 (ms per layer, K+V GB/s; strided K/V views of a multi-layer cache)")
    header = f"{'B':>3} {'S':>5} {'T':>2} | {'K+V MB':>6} | {'kernel':>14} {'spread':>6} | {'SDPA folded':>14}" \
             f" {'spread':>6} |" \
             f" {'speedup':>7} | {'% stream':>8} | {'bound ms':>8}"
    print(header)
    print("-" * len(header))
    g = HEADS // KV_HEADS
    for B, S, T in cases:
        layer_bytes = 2 * B * KV_HEADS * S * HEAD_DIM * 4
        layers = max(2, math.ceil(ROTATION_BYTES / layer_bytes))
        capacity = S + 64  # a larger cache than the slots in use, so K and V are strided views
        kbuf = torch.randn(layers, B, KV_HEADS, capacity + 1, HEAD_DIM)
        vbuf = torch.randn(layers, B, KV_HEADS, capacity + 1, HEAD_DIM)
        q = torch.randn(B, HEADS, T, HEAD_DIM)
        allowed = causal_allowed(B, T, S)
        folded = allowed[:, None, None].expand(B, 1, g, T, S).reshape(B, 1, g * T, S)
        bias = torch.zeros(folded.shape).masked_fill_(~folded, float("-inf"))
        views = [(kbuf[i, :, :, :S], vbuf[i, :, :, :S]) for i in range(layers)]
        kernel = Rotation(cpu.attention, [(q, k, v, allowed) for k, v in views])
        sdpa = Rotation(sdpa_folded, [(q, k, v, bias) for k, v in views])
        samples = interleaved({"kernel": kernel, "sdpa": sdpa}, rounds)
        med = {k: stat(v) for k, v in samples.items()}
        gbs = layer_bytes / med["kernel"] / 1e9
        print(f"{B:>3} {S:>5} {T:>2} | {layer_bytes / 1e6:6.1f} | {med['kernel'] * 1e3:7.3f} {gbs:5.1f}GB/s"
              f" {spread(samples['kernel']) * 100:5.0f}% | {med['sdpa'] * 1e3:7.3f}"
              f" {layer_bytes / med['sdpa'] / 1e9:5.1f}GB/s {spread(samples['sdpa']) * 100:5.0f}% |"
              f" {med['sdpa'] / med['kernel']:6.2f}x |"
              f" {gbs * 1e9 / bw * 100:7.0f}% | {layer_bytes / bw * 1e3:8.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["linear", "attention"], help="run one half of the benchmark")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--stat", choices=sorted(STAT), default="median", help="statistic over rounds to report")
    parser.add_argument("--copies", type=int, default=30, help="distinct weights per linear shape")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 16, 32, 64], help="rows of x for linear")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    seconds = cpu.build()
    print(f"kernels: {cpu.build_dir()} (ready in {seconds:.1f} s)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average before: {load()}")
    stat = STAT[args.stat]
    print(f"reporting the {args.stat} over {args.rounds} interleaved rounds")
    bw = stream_bandwidth(args.rounds, stat)
    print(f"streaming read bound (torch.sum of 256 MiB): {bw / 1e9:.1f} GB/s")
    if args.only in (None, "linear"):
        bench_linear(args.m, args.copies, args.rounds, bw, stat)
    if args.only in (None, "attention"):
        bench_attention(ATTENTION_CASES, args.rounds, bw, stat)
    print(f"\nload average after: {load()}; {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
