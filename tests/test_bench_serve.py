"""`magicdec bench serve` against a real `magicdec serve` subprocess (the built-in SmolLM2 on CPU, self-
speculation): one invocation runs the same closed-loop trace without speculation (extra body
`speculation.gamma` 0) and with the server's default; then `--report` re-renders the run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import ENGINE, ServerProcess, started

from magicdec.bench import serve as sv
from magicdec.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*ENGINE, "--max-num-seqs", "4", "--spec", "self", "--budget", "128", "--gamma", "2"]
    yield from started(tmp_path_factory.mktemp("serve"), "bench", args)


def test_parsers() -> None:
    assert sv.parse_goodput("ttft:2, tpot:0.2") == {"ttft": 2.0, "tpot": 0.2}
    with pytest.raises(ValueError, match="unknown SLO"):
        sv.parse_goodput("latency:1")
    cs = sv.parse_configs(['plain={"speculation": {"gamma": 0}}', "spec"])
    assert [(c.name, c.extra_body) for c in cs] == [("plain", {"speculation": {"gamma": 0}}), ("spec", {})]
    with pytest.raises(ValueError, match="JSON object"):
        sv.parse_extra_body("[1]")


def test_plain_and_speculative_on_one_trace(server: ServerProcess, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["bench", "serve", "--base-url", f"{server.url}/v1", "--requests", "4", "--prompt-len", "64-128",
               "--output-len", "4-8", "--concurrency", "2", "--seed", "3", "--goodput", "ttft:60,tpot:10",
               "--configs", 'plain={"speculation": {"gamma": 0}}', "spec", "--out", str(out), "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    for name in ("results.jsonl", "results.md", "serve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    head = lines[0]
    assert head["type"] == "header" and head["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert head["base_url"] == f"{server.url}/v1" and "bench serve" in head["command"]
    drawn = head["trace"]["output_lens"]
    assert len(drawn) == 4 and all(4 <= n <= 8 for n in drawn)
    assert all(64 <= n <= 128 for n in head["trace"]["prompt_lens"])
    reqs = {c: [r for r in lines if r["type"] == "request" and r["config"] == c] for c in ("plain", "spec")}
    sums = {r["config"]: r for r in lines if r["type"] == "summary"}
    assert list(sums) == ["plain", "spec"]

    for name, rs in reqs.items():
        assert [r["request"] for r in rs] == [0, 1, 2, 3]
        for r in rs:
            assert r["error"] is None and r["status"] == 200 and r["ids_known"], r
            assert r["output_tokens"] == drawn[r["request"]]  # ignore_eos: exactly the drawn lengths
            assert r["prompt_tokens"] == head["trace"]["prompt_lens"][r["request"]]
            assert 0 < r["ttft_s"] <= r["e2e_s"] and r["tpot_s"] > 0 and r["itl_max_s"] is not None
            assert r["first_token_s"] >= r["arrival_s"] and r["meets_slos"] is True
            assert r["speculation"] is not None
        s = sums[name]
        assert s["requests"] == s["sent"] == 4 and s["errors"] == {}
        assert s["output_tokens"] == sum(drawn) and s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
        assert s["goodput_rps"] == pytest.approx(s["requests_per_s"]) and s["good_requests"] == 4
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(s[key]) == {"mean", "p50", "p90", "p99"} and s[key]["p50"] > 0, key
    # plain: no drafts; spec: the server's self-speculation drafted
    assert all(r["draft_tokens"] == 0 for r in reqs["plain"])
    assert sums["plain"]["acceptance_rate"] is None
    assert sum(r["draft_tokens"] for r in reqs["spec"]) > 0 and sums["spec"]["acceptance_rate"] is not None
    # exactness through the server: the greedy ids of both runs are equal
    assert [r["tokens_sha1"] for r in reqs["plain"]] == [r["tokens_sha1"] for r in reqs["spec"]]
    assert sums["spec"]["matches_reference"] is True and sums["spec"]["reference"] == "plain"
    assert all(r["matches_reference"] for r in reqs["spec"])

    table = (out / "results.md").read_text()
    assert "| plain |" in table and "| spec |" in table and "goodput" in table
    assert table in printed.out

    again = tmp_path / "report"
    assert main(["bench", "serve", "--report", str(out), str(out), "--out", str(again)]) == 0
    merged = (again / "results.md").read_text()
    assert "| run:plain |" in merged and "| run:spec |" in merged and "**NO**" not in merged
