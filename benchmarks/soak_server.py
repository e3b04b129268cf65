"""Soak test of `magicdec serve`: N concurrent streaming clients for D seconds, then a JSON summary.

Clients send a mix of long prompts (corpus passages of 2K–6K tokens, `magicdec.bench.corpora.make_prompts`) and short
ones, all greedy (temperature 0, ignore_eos, token ids returned); some disconnect after a few chunks. The
script records the 5xx answers, the server's RSS over time (it must stay flat after the warm-up), the
running requests and KV-cache usage at the end (both must return to 0), and checks the greedy tokens of a
sample of completed requests against offline generation (`LLM.generate`, one prompt at a time) once the
server is stopped.

    .venv/bin/python benchmarks/soak_server.py                          # starts a server: 16 clients, 300 s
    .venv/bin/python benchmarks/soak_server.py --clients 4 --duration 30 --server-args "--spec self --budget 256"
    .venv/bin/python benchmarks/soak_server.py --url http://127.0.0.1:8000 --server-pid 1234

Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

SHORT_PROMPTS = ["It is a truth universally acknowledged", "The capital of France is", "Once upon a time, there",
                 "def fibonacci(n):", "The quick brown fox", "In 1815, the Battle of", "My favourite food is",
                 "Water boils at a temperature of", "The three primary colours are", "Dear Sir, I write to"]


def load_tokenizer(model: str | None) -> Any:
    """The model's tokenizer alone (no weights)."""
    from magicdec.loading import _is_gguf, builtin_model_path, gguf_cache_dir
    from magicdec.loading.tokenizer import Tokenizer

    p = builtin_model_path() if model is None else Path(model).expanduser()
    if p.suffix == ".gguf" or _is_gguf(p):
        return Tokenizer.from_gguf(p, gguf_cache_dir(p))
    return Tokenizer.from_dir(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def gauges(client: httpx.Client) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    want = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
    text = client.get("/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in want}


@dataclass
class Record:
    started: int = 0
    completed: int = 0
    disconnected: int = 0
    status: dict[str, int] = field(default_factory=dict)
    transport_errors: list[str] = field(default_factory=list)
    generated_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # completed greedy requests kept for the check


async def client_loop(i: int, url: str, headers: dict[str, str], prompts: dict[str, list[list[int]]],
                      args: argparse.Namespace, deadline: float, rec: Record) -> None:
    rng = random.Random(args.seed * 1000 + i)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600, connect=30)) as c:
        while time.monotonic() < deadline:
            kind = "long" if rng.random() < args.long_share else "short"
            prompt = rng.choice(prompts[kind])
            max_tokens = rng.randint(args.min_tokens, args.max_tokens)
            leave_after = rng.randint(1, 4) if rng.random() < args.disconnect_share else None
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "return_token_ids": True, "stream_options": {"include_usage": True}}
            rec.started += 1
            t0 = time.monotonic()
            ids: list[int] = []
            chunks = 0
            try:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    key = str(r.status_code)
                    rec.status[key] = rec.status.get(key, 0) + 1
                    if r.status_code != 200:
                        await r.aread()
                        await asyncio.sleep(1.0 if r.status_code == 503 else 0.1)
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        for choice in event["choices"]:
                            if not ids and choice.get("token_ids"):
                                rec.ttft.append(time.monotonic() - t0)
                            ids += choice.get("token_ids") or []
                            chunks += 1
                        if leave_after is not None and chunks >= leave_after:
                            break
                if leave_after is not None and chunks >= leave_after:
                    rec.disconnected += 1
                    continue
            except httpx.TransportError as e:
                rec.transport_errors.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.5)
                continue
            rec.completed += 1
            rec.generated_tokens += len(ids)
            if len(ids) != max_tokens:
                rec.transport_errors.append(f"a completed stream had {len(ids)} tokens, not {max_tokens}")
            kept = [s for s in rec.samples if s["kind"] == kind]
            if len(kept) < args.check // 2 + (kind == "short") * (args.check % 2):
                rec.samples.append({"kind": kind, "prompt": prompt, "max_tokens": max_tokens, "tokens": ids})


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "magicdec", "serve", "--port", str(port), *model_flags(args),
           *shlex.split(args.server_args)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def model_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in ("model", "device", "dtype"):
        if getattr(args, name):
            flags += [f"--{name}", getattr(args, name)]
    return flags


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
            try:
                if c.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"the server at {url} was not ready within {timeout:.0f} s")


def offline_check(args: argparse.Namespace, samples: list[dict[str, Any]]) -> dict[str, Any]:
    from magicdec import LLM, SamplingParams

    llm = LLM(args.model, device=args.device or "cpu", dtype=args.dtype)
    mismatches = []
    for s in samples:
        want = llm.generate([s["prompt"]], SamplingParams(max_new_tokens=s["max_tokens"], ignore_eos=True))
        got = want.outputs[0].token_ids
        if got != s["tokens"]:
            first = next((k for k, (a, b) in enumerate(zip(got, s["tokens"])) if a != b), min(len(got),
                                                                                              len(s["tokens"])))
            mismatches.append({"kind": s["kind"], "prompt_tokens": len(s["prompt"]), "first_difference": first})
    return {"checked": len(samples), "kinds": [s["kind"] for s in samples], "mismatches": mismatches}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--server-pid", type=int, help="with --url: the server's process id, to sample its RSS")
    p.add_argument("--api-key", default=os.environ.get("MAGICDEC_API_KEY"))
    p.add_argument("--server-args", default="--spec self --budget 256 --gamma 3",
                   help="flags for the server this script starts (besides --model/--device/--dtype)")
    p.add_argument("--model", help="the model (default: the built-in one); also the offline check's")
    p.add_argument("--device", help="the server's and the offline check's device")
    p.add_argument("--dtype")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=300.0, help="seconds during which clients start requests")
    p.add_argument("--warmup", type=float, default=60.0, help="RSS must be flat after this many seconds "
                                                                "(at most half the duration)")
    p.add_argument("--long-share", type=float, default=0.3, help="share of requests with a 2K–6K-token prompt")
    p.add_argument("--long-min", type=int, default=2048)
    p.add_argument("--long-max", type=int, default=6144)
    p.add_argument("--disconnect-share", type=float, default=0.2, help="share of clients leaving mid-stream")
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--check", type=int, default=4, help="completed requests checked against offline generation")
    p.add_argument("--rss-growth-mb", type=float, default=64.0, help="allowed RSS growth after the warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the summary here")
    args = p.parse_args()

    from magicdec.bench.corpora import load_corpus, make_prompts

    tok = load_tokenizer(args.model)
    rng = random.Random(args.seed)
    corpus = load_corpus("austen")
    long = make_prompts(tok, corpus, lengths=[rng.randint(args.long_min, args.long_max) for _ in range(24)],
                        seed=args.seed)
    short = [tok.encode(t) for t in SHORT_PROMPTS]
    short += make_prompts(tok, corpus, lengths=[rng.randint(24, 160) for _ in range(14)], seed=args.seed + 1)
    prompts = {"long": long, "short": short}

    proc = None
    log = Path(tempfile.mkdtemp(prefix="magicdec-soak-")) / "server.log"
    if args.url:
        url, pid = args.url.rstrip("/"), args.server_pid
    else:
        proc, url = start_server(args, log)
        pid = proc.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    t_start = time.monotonic()
    wait_ready(url, proc)
    load_s = time.monotonic() - t_start

    rss: list[tuple[float, float]] = []
    busy: list[dict[str, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as c:
            while not stop.is_set():
                if pid is not None and (m := rss_mb(pid)) is not None:
                    rss.append((round(time.monotonic() - t0, 1), round(m, 1)))
                try:
                    busy.append({"t": round(time.monotonic() - t0, 1), **gauges(c)})
                except httpx.HTTPError:
                    pass
                stop.wait(5.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rec = Record()

    async def run_clients() -> None:
        deadline = time.monotonic() + args.duration
        await asyncio.gather(*(client_loop(i, url, headers, prompts, args, deadline, rec) for i in range(args.clients)))

    asyncio.run(run_clients())
    elapsed = time.monotonic() - t0
    # everything finished or aborted: nothing may run or hold KV blocks any more
    final: dict[str, float] = {}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            final = gauges(c)
            if final.get("vllm:num_requests_running") == 0 and final.get("vllm:kv_cache_usage_perc") == 0:
                break
            time.sleep(0.5)
    stop.set()
    sampler.join()
    exit_code = None
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(120)

    check = offline_check(args, rec.samples) if rec.samples else {"checked": 0, "mismatches": []}
    warm = min(args.warmup, args.duration / 2)
    after = [m for t, m in rss if t >= warm]
    growth = (max(after) - after[0]) if len(after) > 1 else 0.0
    fivexx = sum(n for s, n in rec.status.items() if s.startswith("5") and s != "503")
    summary = {
        "url": url, "clients": args.clients, "duration_s": round(elapsed, 1), "server_load_s": round(load_s, 1),
        "requests": {"started": rec.started, "completed": rec.completed, "disconnected": rec.disconnected,
                     "status": rec.status, "5xx_excluding_503": fivexx, "503": rec.status.get("503", 0),
                     "transport_errors": len(rec.transport_errors), "first_errors": rec.transport_errors[:5]},
        "generated_tokens": rec.generated_tokens,
        "generation_tokens_per_s": round(rec.generated_tokens / elapsed, 2),
        "ttft_s": {"p50": round(statistics.median(rec.ttft), 3) if rec.ttft else None,
                   "max": round(max(rec.ttft), 3) if rec.ttft else None},
        "final": final,
        "busy_samples": busy[-3:],
        "rss_mb": {"samples": rss, "warmup_s": warm, "after_warmup_first": after[0] if after else None,
                   "after_warmup_max": max(after) if after else None, "growth_after_warmup": round(growth, 1)},
        "greedy_check": check,
        "server_exit_code": exit_code,
        "server_log": str(log) if proc is not None else None,
    }
    ok = (fivexx == 0 and not rec.transport_errors and final.get("vllm:kv_cache_usage_perc") == 0
          and final.get("vllm:num_requests_running") == 0 and growth <= args.rss_growth_mb
          and not check["mismatches"] and exit_code in (None, 0) and rec.completed > 0)
    summary["ok"] = ok
    text = re.sub(r"\[\s+([-\d.]+),\s+([-\d.]+)\s+\]", r"[\1, \2]", json.dumps(summary, indent=1))  # [t, MB] pairs
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
