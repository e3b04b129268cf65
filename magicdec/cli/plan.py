"""`magicdec plan`: predicted step times, best γ and speedup over a batch × context grid.

Prints a table (or, with ``--json``, only a JSON list of rows) and draws speedup against batch, one
line per context, into a PNG. Contexts are plain integers or carry a ``k`` suffix meaning ×1024
(``32k`` = 32768; the paper's decimal "32000" is written ``32000``).
Weights are never loaded: models are known shapes or HF config.json files.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from magicdec.cli.args import parse_count
from magicdec.costmodel import CostModel, DraftSpec, critical_context, load_profile, resolve_model
from magicdec.costmodel.experts import expected_active_experts, expert_weight_bytes, load_routing, moe_layer_count
from magicdec.costmodel.hardware import BUILTIN_PROFILES, DTYPE_BYTES
from magicdec.costmodel.steps import WEIGHT_BITS
from magicdec.parallel.tp import check_shardable

K = 1024  # the `k` suffix of --context
DEFAULT_PNG = "plan.png"


def parse_budget(text: str) -> int | None:
    """A positive token count, or ``full`` for a draft that attends its whole cache."""
    if text.strip().lower() in ("full", "none"):
        return None
    return parse_count(text)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="predict step times, best gamma and speedup from the cost model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="known shape name (e.g. llama-3.1-8b) or HF config.json path")
    p.add_argument("--hardware", default="h100",
                   help=f"built-in profile ({', '.join(BUILTIN_PROFILES)}) or a profile .json (default h100)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--context", type=parse_count, nargs="+", default=[parse_count(c) for c in
                                                                         ("4k", "8k", "32k", "128k")],
                   help="contexts in tokens; 'k' suffix = 1024 (default 4k 8k 32k 128k)")
    p.add_argument("--alpha", type=float, default=0.8, help="acceptance rate per drafted token (default 0.8)")
    p.add_argument("--spec", choices=("self", "draft"), default="self",
                   help="self-speculation on a sparse cache, or a separate draft model")
    p.add_argument("--draft-model", help="draft model (name or config.json) for --spec draft")
    p.add_argument("--draft-tp", type=int, help="draft model's tensor-parallel degree (default: --tp)")
    p.add_argument("--budget", type=parse_budget, default=512,
                   help="draft KV budget in tokens, or 'full' (default 512)")
    p.add_argument("--draft-weights", choices=tuple(WEIGHT_BITS), default="full",
                   help="--spec self: the draft reads the target's weights as they are (full) or quantized "
                        "(int8: 1 byte a weight; int4: 0.625 bytes) (default full)")
    p.add_argument("--gamma", type=int, help="fix gamma instead of choosing the best one")
    p.add_argument("--max-gamma", type=int, default=8, help="largest gamma searched (default 8)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    p.add_argument("--routing", help="a mixture of experts' measured routing, JSON: {\"counts\": [...]} (how often "
                                     "each expert was picked; one list, or one per MoE layer) or {\"probs\": "
                                     "[[...]]} (default: uniform routing)")
    p.add_argument("--round-overhead-ms", type=float,
                   help="override the profile's fixed cost per speculation round (ms)")
    p.add_argument("--png",
                   help=f"where to draw speedup vs batch (default {DEFAULT_PNG}; with --json only if given)")
    p.add_argument("--json", action="store_true", help="print only a JSON list of rows to stdout")
    p.set_defaults(func=run)


def build_model(args: argparse.Namespace) -> CostModel:
    target = resolve_model(args.model)
    hardware = load_profile(args.hardware)
    if args.round_overhead_ms is not None:
        hardware = hardware.with_(round_overhead_s=args.round_overhead_ms * 1e-3)
    if args.tp > 1:
        check_shardable(target, args.tp)
    if args.spec == "draft":
        if args.draft_weights != "full":
            raise ValueError("--draft-weights quantizes the target's own weights: use it with --spec self")
        if not args.draft_model:
            raise ValueError("--spec draft needs --draft-model NAME_OR_PATH")
        draft = DraftSpec("draft", args.budget, resolve_model(args.draft_model), args.draft_tp)
    else:
        if args.draft_model:
            raise ValueError("--draft-model is only used with --spec draft")
        draft = DraftSpec("self", args.budget, weight_bits=WEIGHT_BITS[args.draft_weights])
    routing = None
    if getattr(args, "routing", None):
        if not target.n_experts:
            raise ValueError(f"--routing: {target.name} is a model without experts")
        routing = load_routing(args.routing, target.n_experts_per_token)
    return CostModel(target, hardware, draft, DTYPE_BYTES[args.dtype], args.tp, routing)


def plan_rows(model: CostModel, batches: list[int], contexts: list[int], alpha: float, gamma: int | None,
              max_gamma: int = 8) -> list[dict[str, Any]]:
    rows = []
    for n in contexts:
        for b in batches:
            if gamma is None:
                g, s = model.best_gamma(b, n, alpha, max_gamma)
            else:
                g, s = gamma, model.speedup(b, n, gamma, alpha)
            row = {
                "batch": b, "context": n, "gamma": g,
                "t_target_ms": model.t_target(b, n) * 1e3,
                "t_verify_ms": model.t_verify(b, n, g) * 1e3,
                "t_draft_ms": model.t_draft(b, n) * 1e3,
                "speedup": s,
            }
            if model.target.n_experts:  # expected distinct experts a MoE layer reads: decoding, verifying
                row["experts_target"] = expected_active_experts(model.target, b, model.routing)
                row["experts_verify"] = expected_active_experts(model.target, b * (g + 1), model.routing)
            rows.append(row)
    return rows


def format_table(model: CostModel, rows: list[dict[str, Any]], alpha: float) -> str:
    hw, d = model.hardware, model.draft
    drafter = "self" if d.kind == "self" else (d.model.name if d.model else "model")
    budget = "full cache" if d.budget is None else f"budget {d.budget}"
    if d.kind == "self":
        budget += ", " + ("full-precision" if d.weight_bits is None else f"int{d.weight_bits}") + " weights"
    crit = critical_context(model.target, hw, model.dtype_bytes, model.tp)
    lines = [
        f"target {model.target.name}  drafter {drafter} ({budget})  hardware {hw.name} [{hw.source}]  "
        f"tp {model.tp}  alpha {alpha}",
        f"critical context (memory-bound at any batch, decode): {crit:,.0f} tokens",
        *_moe_line(model),
        f"{'batch':>6} {'context':>8} {'gamma':>5} {'T_T ms':>9} {'T_V ms':>9} {'T_D ms':>9} "
        f"{'speedup':>8}  memory",
    ]
    for r in rows:
        fits = model.fits(r["batch"], r["context"], r["gamma"])
        lines.append(
            f"{r['batch']:>6} {r['context']:>8} {r['gamma']:>5} {r['t_target_ms']:>9.2f} "
            f"{r['t_verify_ms']:>9.2f} {r['t_draft_ms']:>9.2f} {r['speedup']:>8.2f}  "
            f"{'ok' if fits else 'OUT OF MEMORY'}"
        )
    return "\n".join(lines)


def _moe_line(model: CostModel) -> list[str]:
    t = model.target
    if not t.n_experts:
        return []
    bits = 8 * expert_weight_bytes(t, model.dtype_bytes)
    routing = "uniform routing" if model.routing is None else "measured routing"
    return [f"mixture of experts: {moe_layer_count(t)} MoE layers, {t.n_experts} experts, top-{t.n_experts_per_token}, "
            f"{bits:g} bits a weight, {routing}; a step reads the experts its batch x (gamma+1) tokens route to"]


def draw_png(rows: list[dict[str, Any]], path: str, title: str, fixed_gamma: int | None = None,
             out_of_memory: frozenset[tuple[int, int]] = frozenset()) -> str:
    """Speedup against batch, one line per context; rows whose caches do not fit are crossed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in dict.fromkeys(r["context"] for r in rows):
        pts = [(r["batch"], r["speedup"]) for r in rows if r["context"] == n]
        label = f"{n // K}k" if n % K == 0 else str(n)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"context {label}")
    oom = [(r["batch"], r["speedup"]) for r in rows if (r["batch"], r["context"]) in out_of_memory]
    if oom:
        ax.scatter([p[0] for p in oom], [p[1] for p in oom], marker="x", s=80, color="black", zorder=3,
                   label="caches exceed device memory")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"predicted speedup ({'best gamma' if fixed_gamma is None else f'gamma {fixed_gamma}'})")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    try:
        if args.gamma is not None and args.gamma < 0:
            raise ValueError(f"--gamma must be >= 0, got {args.gamma}")
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
        if any(b <= 0 for b in args.batch):
            raise ValueError("--batch sizes must be positive")
        model = build_model(args)
        rows = plan_rows(model, args.batch, args.context, args.alpha, args.gamma, args.max_gamma)
    except (ValueError, FileNotFoundError) as exc:
        print(f"magicdec plan: error: {exc}", file=sys.stderr)
        return 2
    title = f"{model.target.name} on {model.hardware.name} (tp {model.tp}), alpha {args.alpha}"
    oom = frozenset((r["batch"], r["context"]) for r in rows
                    if not model.fits(r["batch"], r["context"], r["gamma"]))
    if args.json:
        print(json.dumps(rows))
        if args.png:
            print(f"wrote {draw_png(rows, args.png, title, args.gamma, oom)}", file=sys.stderr)
        return 0
    print(format_table(model, rows, args.alpha))
    print(f"wrote {draw_png(rows, args.png or DEFAULT_PNG, title, args.gamma, oom)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `plan` on its own (``python -m magicdec.cli.plan ...``)."""
    parser = argparse.ArgumentParser(prog="magicdec")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
