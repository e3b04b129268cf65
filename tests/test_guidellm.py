"""GuideLLM, the load generator of the vLLM ecosystem, against `magicdec serve` (self-speculation): a
concurrent benchmark with streaming on (GuideLLM sends `stream_options.continuous_usage_stats`) finishes
with no errors and reports TTFT and ITL, on the completions and the chat route."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import ENGINE, MODEL, ServerProcess, started

from magicdec.loading import builtin_model_path, gguf_cache_dir

pytestmark = pytest.mark.slow

REQUESTS = 6


def guidellm() -> str:
    exe = shutil.which("guidellm") or str(Path(sys.executable).parent / "guidellm")
    if not Path(exe).exists():
        pytest.fail("guidellm is not installed: pip install -e '.[test]' (guidellm is in the test extra)")
    return exe


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*ENGINE, "--max-num-seqs", "4", "--spec", "self", "--budget", "64", "--gamma", "2"]
    yield from started(tmp_path_factory.mktemp("serve"), "guidellm", args)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm_concurrent_streaming_benchmark(server: ServerProcess, tmp_path: Path, route: str) -> None:
    tokenizer = gguf_cache_dir(builtin_model_path())  # the built-in model's tokenizer, converted by the server
    out = tmp_path / "report.json"
    command = [guidellm(), "run",
               "--backend", f"kind=openai_http,target={server.url},model={MODEL},request_format={route},"
                            "stream=true,http2=false",
               "--profile", "kind=concurrent,streams=2", "--constraint", f"kind=max_requests,count={REQUESTS}",
               "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
               "--tokenizer", f"kind=hf_auto,model={tokenizer}", "--output", f"kind=json,path={out}",
               "--disable-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]
    assert metrics["request_totals"] == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}
    ttft = metrics["time_to_first_token_ms"]["successful"]
    itl = metrics["inter_token_latency_ms"]["successful"]
    assert ttft["count"] == REQUESTS and ttft["mean"] > 0
    assert itl["count"] > 0 and itl["mean"] > 0
    assert metrics["output_token_count"]["successful"]["mean"] == 16  # usage from the server's chunks
