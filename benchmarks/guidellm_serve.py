"""GuideLLM against `magicdec serve`: start a server (or use one), run GuideLLM's concurrent profile over a list
of concurrencies with streaming on, and print TTFT, ITL and throughput per concurrency (GuideLLM's JSON
report is kept).

    .venv/bin/python benchmarks/guidellm_serve.py                                   # built-in model, self-spec
    .venv/bin/python benchmarks/guidellm_serve.py --streams 1,4,8 --requests 32 --prompt-tokens 256 \\
        --server-args "--spec none"
    .venv/bin/python benchmarks/guidellm_serve.py --url http://127.0.0.1:8000 --model NAME --tokenizer DIR

Exit status 0 when every request succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from magicdec.loading import builtin_model_path, gguf_cache_dir

BUILTIN = "SmolLM2-135M-Instruct.Q4_1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"the server was not ready within {timeout:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (else one is started)")
    ap.add_argument("--model", default=BUILTIN, help="the served model's name")
    ap.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: the built-in model's)")
    ap.add_argument("--server-args", default="--device cpu --spec self --budget 128 --gamma 2",
                    help="flags for the started server")
    ap.add_argument("--route", default="/v1/chat/completions", choices=["/v1/completions", "/v1/chat/completions"])
    ap.add_argument("--streams", default="1,2,4", help="concurrencies, comma-separated")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "guidellm_serve.json")
    args = ap.parse_args()
    exe = shutil.which("guidellm") or str(Path(sys.executable).parent / "guidellm")
    if not Path(exe).exists():
        sys.exit("guidellm is not installed: pip install guidellm")
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "magicdec", "serve", "--port", str(port),
                                 "--max-num-seqs", str(max(int(s) for s in args.streams.split(","))),
                                 *shlex.split(args.server_args)])
        wait_ready(url, proc)
    tokenizer = args.tokenizer or str(gguf_cache_dir(builtin_model_path()))
    try:
        command = [exe, "run", "--backend", f"kind=openai_http,target={url},model={args.model},"
                   f"request_format={args.route},stream=true,http2=false",
                   "--profile", "kind=concurrent", "--override", "profile.streams", args.streams,
                   "--constraint", f"kind=max_requests,count={args.requests}",
                   "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                             f"output_tokens={args.output_tokens}",
                   "--tokenizer", f"kind=hf_auto,model={tokenizer}", "--output", f"kind=json,path={args.out}",
                   "--disable-progress"]
        run = subprocess.run(command, capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        if run.returncode != 0:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n")
            return 1
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    errors = 0
    print(f"{'streams':>7} {'ok':>4} {'err':>4} {'TTFT ms (median)':>17} {'ITL ms (median)':>16} {'output tok/s':>13}")
    for b in json.loads(args.out.read_text())["benchmarks"]:
        m = b["metrics"]
        totals = m["request_totals"]
        errors += totals["errored"] + totals["incomplete"]
        ok = m["time_to_first_token_ms"]["successful"]
        print(f"{b['config']['strategy'].get('streams', '?'):>7} {totals['successful']:>4} {totals['errored']:>4} "
              f"{ok['median']:>17.1f} {m['inter_token_latency_ms']['successful']['median']:>16.1f} "
              f"{m['output_tokens_per_second']['successful']['mean']:>13.1f}")
    print(f"report: {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
