"""What a benchmark writes: JSON lines, a markdown table and PNG plots.

This file owns the machine description and header record, reading and writing ``results.jsonl`` (a header
record, then one record per point and configuration), `markdown` (the tables, with a banner when the
acceptance was synthetic) and the two plots: speedup against batch size (one line per context, the best
speculative configuration at each point) and throughput against per-token latency (each point a batch
size; plain and speculative per context, and transformers when measured).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

SYNTHETIC_BANNER = ("> **SYNTHETIC ACCEPTANCE (α = {a})**: draft tokens were accepted with probability α regardless "
                    "of their values. Throughputs and speedups measure the system, not a model's real acceptance; "
                    "the outputs are not the model's.")


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, library versions and the accelerator, if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def header(argv: list[str], device: torch.device, **fields: Any) -> dict[str, Any]:
    return {"type": "header", "command": " ".join(["magicdec", "bench", *argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(device),
            "magicdec_commit": git_commit(), **fields}


class JsonlWriter:
    """Appends one JSON object per line, flushed at once (a crash keeps what was measured). A header record
    waits for the first measured record: a run that measures nothing leaves no file (nor its folder)."""

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, None
        self.pending: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None and record.get("type") == "header":
            self.pending.append(record)
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("w")
        for r in [*self.pending, record]:
            self.file.write(json.dumps(r) + "\n")
        self.pending = []
        self.file.flush()

    @property
    def written(self) -> bool:
        """Whether a measured record was written (the file exists)."""
        return self.file is not None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_jsonl(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the point records of a results file."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    head = next((r for r in lines if r.get("type") == "header"), {})
    return head, [r for r in lines if r.get("type") == "point"]


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "—" if x is None else format(x, fmt)


def _same(x: bool | None) -> str:
    return "—" if x is None else ("yes" if x else "**NO**")


def gamma_label(rec: dict[str, Any]) -> str:
    """The γ of a record: fixed, or for auto the rounds each γ was chosen, per run ('auto: 0×29 1×1.5')."""
    counts = rec.get("gamma_counts") or {}
    if rec.get("gamma") != "auto" or not counts:
        return str(rec.get("gamma") or "—")
    return "auto: " + " ".join(f"{g}×{n:g}" for g, n in counts.items())


def markdown(head: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The results as markdown: context lines, then our table and the peers' table."""
    m = head.get("machine", {})
    lines = [f"Command: `{head.get('command', '?')}`  ",
             f"Date: {head.get('date', '?')}; model: {head.get('model', '?')} ({head.get('dtype', '?')}); "
             f"corpus: {head.get('corpus', '?')}  ",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, "
             f"device {m.get('device', '?')}{', ' + m['gpu'] if m.get('gpu') else ''}", ""]
    synthetic = sorted({r["synthetic_acceptance"] for r in records if r.get("synthetic")})
    if synthetic:
        lines += [SYNTHETIC_BANNER.format(a=", ".join(map(str, synthetic))), ""]
    ours = [r for r in records if r.get("engine") == "magicdec"]
    peers = sorted({name for r in ours for name in r.get("over_peers", {})}, key=lambda n: (n != "hf-plain", n))
    cols = ["batch", "context", "config", "γ", "tok/s", "ms/token/seq", "acceptance", "mean accepted",
            "speedup (min–max)", "steady speedup", "= plain", *[f"× {p}" for p in peers], "prefill s", "synthetic"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in ours:
        spread = "1" if r["config"] == "plain" else f"{_f(r.get('speedup'))} ({_f(r.get('speedup_min'))}–" \
                                                    f"{_f(r.get('speedup_max'))})"
        over = [_f(r.get("over_peers", {}).get(p)) for p in peers]
        lines.append("| " + " | ".join([str(r["batch"]), str(r["context"]), r["config"], gamma_label(r),
                                        _f(r["tokens_per_s"], ".1f"), _f(r["latency_s"] * 1e3, ".1f"),
                                        _f(r.get("acceptance_rate")), _f(r.get("mean_accepted_tokens")), spread,
                                        "—" if r["config"] == "plain" else _f(r.get("steady_speedup")),
                                        _same(r.get("matches_plain")), *over, _f(r.get("prefill_s"), ".1f"),
                                        f"α={r['synthetic_acceptance']}" if r.get("synthetic") else "no"]) + " |")
    hf = [r for r in records if r.get("engine") == "hf"]
    if hf:
        lines += ["", "Peers (transformers `generate`, greedy, same prompts; decode excludes prefill):", "",
                  "| batch | context | peer | tok/s | ms/token/seq | prefill s | = our plain | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in hf:
            lat = r.get("latency_s")
            lines.append(f"| {r['batch']} | {r['context']} | {r['config']} | {_f(r.get('tokens_per_s'), '.1f')} | "
                         f"{_f(lat * 1e3 if lat else None, '.1f')} | {_f(r.get('prefill_s'), '.1f')} | "
                         f"{_same(r.get('matches_plain'))} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def _best(records: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    """The speculative record with the highest speedup at each (batch, context)."""
    best: dict[tuple[int, int], dict[str, Any]] = {}
    for r in records:
        if r.get("engine") == "magicdec" and r.get("speedup") is not None:
            key = (r["batch"], r["context"])
            if key not in best or r["speedup"] > best[key]["speedup"]:
                best[key] = r
    return best


def plot(records: list[dict[str, Any]], out_dir: Path, synthetic: bool = False) -> list[Path]:
    """speedup.png and tradeoff.png in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tag = " [SYNTHETIC acceptance]" if synthetic else ""
    best = _best(records)
    contexts = sorted({c for _, c in best} | {r["context"] for r in records})
    paths = [out_dir / "speedup.png", out_dir / "tradeoff.png"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in contexts:
        pts = sorted((b, r["speedup"], r["config"]) for (b, cc), r in best.items() if cc == c)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"context {c}")
            for b, y, label in pts:
                ax.annotate(label, (b, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xscale("log", base=2)
    batches = sorted({b for b, _ in best})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set(xlabel="batch size", ylabel="speedup over plain decoding (best config)", title="Speculative speedup" + tag)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(contexts):
        color = colors[i % len(colors)]
        series = {"plain": [r for r in records if r.get("engine") == "magicdec" and r["config"] == "plain"],
                  "speculative": [r for (b, cc), r in best.items()],
                  "hf-plain": [r for r in records if r["config"] == "hf-plain" and r.get("tokens_per_s")]}
        for (name, recs), style in zip(series.items(), ("-", "--", ":")):
            pts = sorted((r["latency_s"] * 1e3, r["tokens_per_s"], r["batch"]) for r in recs if r["context"] == c)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=color,
                        label=f"{name}, context {c}")
                for x, y, b in pts if name == "plain" else []:
                    ax.annotate(f"B={b}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if ax.get_lines() and ax.dataLim.y1 > 10 * max(ax.dataLim.y0, 1e-9):
        ax.set_yscale("log")
    ax.set(xlabel="per-token latency per sequence (ms)", ylabel="throughput (generated tokens/s)",
           title="Throughput vs latency" + tag)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def write_report(out_dir: Path, head: dict[str, Any], records: list[dict[str, Any]]) -> list[Path]:
    """results.md and the plots from the records; returns the files written."""
    out_dir = Path(out_dir)
    table = out_dir / "results.md"
    table.write_text(markdown(head, records))
    return [table, *plot(records, out_dir, synthetic=any(r.get("synthetic") for r in records))]
