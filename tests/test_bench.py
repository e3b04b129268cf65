"""`magicdec bench` end to end on a tiny random model: files, record fields, synthetic labels, the
transformers peer, the grid's warm prefix cache, argument parsing and PG-19 skipping; `bench trace`'s
continuous and static batching on the engine."""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from magicdec import LLM, Auto, SamplingParams, SpecConfig
from magicdec.bench.grid import Grid, grid_core
from magicdec.bench.report import read_jsonl
from magicdec.cli import bench
from magicdec.cli.args import parse_count, parse_gamma

POINT_FIELDS = {"type", "engine", "batch", "context", "config", "drafter", "budget", "gamma", "prefill_s",
                "decode_s", "decode_tokens", "tokens_per_s", "latency_s", "synthetic", "synthetic_acceptance",
                "max_new_tokens", "repeats"}
SPEC_FIELDS = {"acceptance_rate", "mean_accepted_tokens", "gamma_history", "gamma_histories", "gamma_counts", "speedup",
               "speedup_min", "speedup_max", "speedups", "matches_plain", "over_peers"}


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text in the tiny model's word-level vocabulary (w3 … w383)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(" ".join(f"w{rng.randrange(3, 384)}" for _ in range(2000)))
    return path


def common(tiny_dir: Path, corpus: Path, out: Path) -> list[str]:
    return ["--model", str(tiny_dir), "--corpus", str(corpus), "--batch", "1", "--context", "64", "--budget", "32",
            "--gamma", "2,auto", "--max-new-tokens", "8", "--repeats", "2", "--warmup", "1", "--quiet",
            "--out", str(out)]


def test_parsing() -> None:
    assert [parse_count(t) for t in ("512", "4k", "8K", "1.5k")] == [512, 4096, 8192, 1536]
    assert parse_gamma("auto") == Auto() and parse_gamma("3") == 3
    for bad in ("0", "1.3", "-2", "k", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_count(bad)
    args = argparse.ArgumentParser()
    bench.register(args.add_subparsers())
    ns = args.parse_args(["bench", "--context", "1k,2k", "4k", "--gamma", "2", "auto"])
    grid = bench.grid_from_args(ns)
    assert grid.contexts == [1024, 2048, 4096] and grid.gammas == [2, Auto()]
    assert [c.label for c in grid.configs()] == ["self-streaming-256-g2", "self-streaming-256-gauto",
                                                 "self-streaming-512-g2", "self-streaming-512-gauto"]
    assert bench.grid_from_args(args.parse_args(["bench", "--quick", "--batch", "64"])).batches == [1, 4]
    with pytest.raises(ValueError, match="draft-model"):
        Grid(methods=["draft"])
    full = Grid(methods=["self", "draft"], drafters=["streaming", "snapkv", "full"], budgets=[96], gammas=[3],
                draft_model="m")
    assert [c.label for c in full.configs()] == ["self-streaming-96-g3", "self-snapkv-96-g3",
                                                 "draft-streaming-96-g3", "draft-full-g3"]


def test_grid_points_decode_from_the_warm_prefix_cache(tiny_dir: Path) -> None:
    """A grid point's runs find the prompts' whole chunks in the prefix cache that the point's one-token
    plain run left there, and give what fresh `generate` calls give, plain and speculative, at each context."""
    llm = LLM(tiny_dir, device="cpu", prefill_chunk=64)
    g = random.Random(1)
    prompts = [[g.randrange(3, 384) for _ in range(200)] for _ in range(2)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    spec = SpecConfig(method="self", budget=96, sinks=4, gamma=3)
    core = grid_core(llm, prompts, params, [spec])
    try:
        for context in (40, 200):
            ids = [p[:context] for p in prompts]
            core.set_speculation(None)
            llm.run(core, ids, replace(params, max_new_tokens=1))  # the point's prefill
            for s in (None, spec):
                core.set_speculation(s)
                warm = llm.run(core, ids, params)
                fresh = llm.generate(ids, params)
                assert [o.token_ids for o in warm.outputs] == [o.token_ids for o in fresh.outputs]
                assert warm.stats.extra["prefix_cached_tokens"] == (2 * 192 if context == 200 else 0)
    finally:
        core.close()


def test_bench_end_to_end_with_hf_peer(tiny_dir: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli(*common(tiny_dir, corpus, out), "--peers", "hf") == 0
    for name in ("results.jsonl", "results.md", "speedup.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    head, records = read_jsonl(out / "results.jsonl")
    assert {"command", "date", "machine", "grid", "model", "definitions"} <= set(head)
    assert {"cpu", "cores", "torch", "device"} <= set(head["machine"])
    ours = [r for r in records if r["engine"] == "magicdec"]
    assert [r["config"] for r in ours] == ["plain", "self-streaming-32-g2", "self-streaming-32-gauto"]
    for r in ours:
        assert POINT_FIELDS <= set(r) and not r["synthetic"] and r["decode_tokens"] == 7
        assert len(r["decode_s_all"]) == 2 and r["tokens_per_s"] > 0
    for r in ours[1:]:
        assert SPEC_FIELDS <= set(r)
        assert r["matches_plain"] is True and len(r["speedups"]) == 2
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert len(r["gamma_histories"]) == 2 and r["gamma_histories"][0] == r["gamma_history"]
        rounds = sum(map(len, r["gamma_histories"])) / 2  # per run, averaged
        assert abs(sum(r["gamma_counts"].values()) - rounds) <= 0.05 * len(r["gamma_counts"])
        assert set(r["over_peers"]) == {"hf-plain", "hf-prompt-lookup"}
    peers = {r["config"]: r for r in records if r["engine"] == "hf"}
    assert set(peers) == {"hf-plain", "hf-prompt-lookup", "hf-assisted"}
    assert peers["hf-plain"]["matches_plain"] is True  # transformers' greedy tokens equal ours
    assert peers["hf-prompt-lookup"]["matches_plain"] is True
    assert peers["hf-plain"]["decode_tokens"] == 7
    assert "skipped" in peers["hf-assisted"]["note"]
    table = (out / "results.md").read_text()
    assert "self-streaming-32-g2" in table and "hf-prompt-lookup" in table and "SYNTHETIC" not in table
    (out / "results.md").unlink()
    assert run_cli("--report", str(out)) == 0 and (out / "results.md").read_text() == table


def test_synthetic_acceptance_is_labelled(tiny_dir: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    assert run_cli(*common(tiny_dir, corpus, out), "--synthetic-acceptance", "0.7") == 0
    head, records = read_jsonl(out / "results.jsonl")
    assert head["synthetic_acceptance"] == 0.7
    assert all(r["synthetic"] and r["synthetic_acceptance"] == 0.7 for r in records)
    spec = [r for r in records if r["config"] != "plain"]
    assert all(r["matches_plain"] is None for r in spec)  # outputs are not the model's: no check
    assert next(r for r in spec if r["gamma"] == 2)["acceptance_rate"] > 0
    table = (out / "results.md").read_text()
    assert "SYNTHETIC ACCEPTANCE (α = 0.7)" in table and "α=0.7" in table


def test_pg19_skips_cleanly_without_datasets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    assert run_cli("--corpus", "pg19", "--out", str(tmp_path / "pg19"), "--quiet") == 0
    assert "skipping" in capsys.readouterr().err
    assert not (tmp_path / "pg19").exists()


def test_jsonl_is_one_object_per_line(tiny_dir: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "lines"
    assert run_cli(*common(tiny_dir, corpus, out), "--gamma", "3", "--repeats", "1", "--warmup", "0") == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["header", "point", "point"]


# ---- `magicdec bench trace` ------------------------------------------------------------------------------

TRACE_REQUEST_FIELDS = {"config", "kind", "gamma", "request", "prompt_tokens", "output_tokens", "arrival_s",
                        "first_token_s", "finished_s", "ttft_s", "tpot_s", "itl_max_s", "e2e_s", "itl_s",
                        "acceptance_rate", "cached_tokens", "preemptions", "tokens_sha1", "matches_reference"}
TRACE_SUMMARY_FIELDS = {"config", "requests", "output_tokens", "makespan_s", "output_tokens_per_s", "requests_per_s",
                        "throughput_vs_plain", "ttft_s", "tpot_s", "itl_s", "itl_max_s", "e2e_s", "acceptance_rate",
                        "prefix_cache_hit_rate", "preemptions", "no_leaks", "matches_reference"}


def test_trace_end_to_end(tiny_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """6 requests, closed loop at concurrency 3, through plain, self (γ 2) and static batching, all on the
    engine: the records, the summaries, identical greedy outputs across the configurations, static batches
    that admit nobody once started, the files."""
    from magicdec.bench.trace import read_results

    out = tmp_path / "trace"
    assert run_cli("trace", "--model", str(tiny_dir), "--corpus", str(corpus), "--requests", "6",
                   "--prompt-len", "100-300", "--output-len", "8", "16", "--concurrency", "3",
                   "--configs", "plain,self", "static", "--gamma", "2", "--budget", "64", "--max-num-seqs", "3",
                   "--num-blocks", "32", "--quiet", "--out", str(out)) == 0
    for name in ("results.jsonl", "results.md", "trace.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "trace.png").read_bytes()[:4] == b"\x89PNG"
    head, requests, summaries = read_results(out / "results.jsonl")
    assert head["options"]["requests"] == 6 and "batch" not in head["options"]  # the trace's options only
    assert {"machine", "options", "trace", "configs", "definitions"} <= set(head)
    tr = head["trace"]
    assert tr["requests"] == 6 and tr["concurrency"] == 3 and tr["rate"] is None
    assert all(100 <= n <= 300 for n in tr["prompt_lens"]) and all(8 <= n <= 16 for n in tr["output_lens"])
    assert [s["config"] for s in summaries] == ["plain", "self-g2", "static"]
    by = {c: sorted((r for r in requests if r["config"] == c), key=lambda r: r["request"])
          for c in ("plain", "self-g2", "static")}
    for recs in by.values():
        assert [r["request"] for r in recs] == list(range(6))
        for r, n_out, n_prompt in zip(recs, tr["output_lens"], tr["prompt_lens"]):
            assert TRACE_REQUEST_FIELDS <= set(r)
            assert r["output_tokens"] == n_out and r["prompt_tokens"] == n_prompt  # ignore_eos: as drawn
            assert 0 <= r["arrival_s"] <= r["first_token_s"] <= r["finished_s"]
            assert r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] and r["tpot_s"] > 0
            assert r["itl_max_s"] == max(r["itl_s"]) and r["e2e_s"] - r["ttft_s"] >= r["itl_max_s"] - 1e-9
        assert sum(r["arrival_s"] == 0 for r in recs) == 3  # closed loop: 3 at once, then one per finish
    # exactness: the engine's greedy tokens with speculation, and in static batches, equal plain continuous batching's
    for c in ("self-g2", "static"):
        assert [r["tokens_sha1"] for r in by[c]] == [r["tokens_sha1"] for r in by["plain"]]
        assert all(r["matches_reference"] for r in by[c])
    assert by["plain"][0]["matches_reference"] is None
    # static batching: requests 3-5 arrive as 0-2 finish, but start only once the whole first batch is done
    first, second = by["static"][:3], by["static"][3:]
    assert min(r["first_token_s"] for r in second) >= max(r["finished_s"] for r in first)
    assert min(r["arrival_s"] for r in second) < max(r["finished_s"] for r in first)  # (one waited)
    assert any(r["draft_tokens"] for r in by["self-g2"]) and by["plain"][0]["acceptance_rate"] is None
    s = {x["config"]: x for x in summaries}
    for x in summaries:
        assert TRACE_SUMMARY_FIELDS <= set(x) and x["requests"] == 6
        assert x["output_tokens"] == sum(tr["output_lens"]) and x["output_tokens_per_s"] > 0
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            d = x[key]
            assert d["p50"] <= d["p90"] <= d["p99"] and d["mean"] > 0
    assert s["plain"]["throughput_vs_plain"] == 1.0 and s["self-g2"]["throughput_vs_plain"] > 0
    assert s["self-g2"]["matches_reference"] is True and s["self-g2"]["reference"] == "plain"
    assert s["plain"]["no_leaks"] and s["self-g2"]["no_leaks"] and s["static"]["no_leaks"]
    assert s["static"]["matches_reference"] is True and s["static"]["prefix_cache_hit_rate"] is not None
    assert 0 < s["self-g2"]["acceptance_rate"] <= 1 and s["static"]["gamma"] == "auto"  # (auto may pick γ 0)
    assert s["static"]["batches"] == 2 and s["static"]["gamma_counts"] and s["self-g2"]["gamma_counts"]
    assert s["plain"]["prefix_cache_hit_rate"] is not None and list(s["plain"]["gamma_counts"]) == ["0"]
    table = (out / "results.md").read_text()
    assert "self-g2" in table and "static" in table and "**NO**" not in table
    (out / "results.md").unlink()
    assert run_cli("trace", "--report", str(out)) == 0 and (out / "results.md").read_text() == table


def test_trace_draws_and_arrivals() -> None:
    """The trace is a function of its seed; Poisson offsets start at 0 and grow; the ranges parse."""
    from magicdec.bench.trace import Arrivals, make_trace, trace_configs

    def prompts(lengths: list[int]) -> list[list[int]]:
        return [[5] * n for n in lengths]

    a = make_trace(prompts, 8, (10, 20), (3, 5), rate=4.0, seed=7)
    b = make_trace(prompts, 8, (10, 20), (3, 5), rate=4.0, seed=7)
    assert a.as_dict() == b.as_dict() and a.as_dict() != make_trace(prompts, 8, (10, 20), (3, 5), rate=4.0).as_dict()
    offs = a.as_dict()["offsets_s"]
    assert offs[0] == 0 and offs == sorted(offs) and len(set(offs)) == 8
    arrivals = Arrivals(a, 100.0)
    assert [r.index for r, _ in arrivals.due(100.0 + offs[3])] == [0, 1, 2, 3] and arrivals.next_time() == 100 + offs[4]
    closed = Arrivals(make_trace(prompts, 5, (10, 10), (3, 3), concurrency=2), 0.0)
    assert [t for _, t in closed.due(1.0)] == [0.0, 0.0] and closed.due(1.0) == []
    closed.freed(0.7)
    closed.freed(0.5)
    assert [(r.index, t) for r, t in closed.due(1.0)] == [(2, 0.5), (3, 0.7)]
    assert bench.parse_range(["4k-7k"]) == (4096, 7168) and bench.parse_range(["32", "128"]) == (32, 128)
    assert bench.parse_range(["64"]) == (64, 64)
    with pytest.raises(ValueError):
        bench.parse_range(["7k-4k"])
    assert [c.name for c in trace_configs(["static", "auto", "self", "plain"], [2, 3])] == \
        ["plain", "self-g2", "self-g3", "auto", "static"]
    with pytest.raises(ValueError, match="unknown configuration"):
        trace_configs(["fast"])


def test_trace_poisson_arrivals(tiny_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """With --rate, every configuration's requests arrive at the trace's offsets; static batches of
    --max-num-seqs wait for their last arrival."""
    from magicdec.bench.trace import read_results

    out = tmp_path / "poisson"
    assert run_cli("trace", "--model", str(tiny_dir), "--corpus", str(corpus), "--requests", "4", "--prompt-len",
                   "64-128", "--output-len", "4-8", "--rate", "40", "--configs", "plain", "static",
                   "--max-num-seqs", "2", "--no-warmup", "--quiet", "--out", str(out)) == 0
    head, requests, summaries = read_results(out / "results.jsonl")
    offsets = head["trace"]["offsets_s"]
    assert head["trace"]["concurrency"] is None and len(offsets) == 4 and head["static_batch"] == 2
    for config in ("plain", "static"):
        recs = sorted((r for r in requests if r["config"] == config), key=lambda r: r["request"])
        assert [r["arrival_s"] for r in recs] == pytest.approx(offsets)
    static = sorted((r for r in requests if r["config"] == "static"), key=lambda r: r["request"])
    assert min(r["first_token_s"] for r in static[2:]) >= offsets[3]  # the second batch waited for request 3
    assert [s["config"] for s in summaries] == ["plain", "static"] and summaries[1]["batches"] == 2


def test_drafter_grid_smoke(tiny_dir: Path, corpus: Path, tmp_path: Path, threads: None) -> None:
    """benchmarks/drafter_grid.py on the tiny model: every configuration's tokens equal plain's, fraction
    budgets resolve to whole blocks, the prompts come from the prefix cache, JSON and markdown are written."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "drafter_grid.py"
    spec = importlib.util.spec_from_file_location("drafter_grid", path)
    assert spec is not None and spec.loader is not None
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    out = tmp_path / "grid.json"
    assert grid.main(["--model", str(tiny_dir), "--corpus", str(corpus), "--contexts", "256", "--batches", "1", "2",
                      "--prompts", "2", "--budgets", "128", "0.5", "0.25", "--drafters", "streaming", "snapkv",
                      "guided", "--weights", "full", "int8", "--gammas", "2", "auto", "--new", "6", "--repeats", "2",
                      "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["seed"] == grid.SEED and result["threads"] == 1 and out.with_suffix(".md").exists()
    # 0.5 × 256 = 128 tokens: the same configurations as 128; 0.25 → 64 tokens: too few for guided's block + window
    assert len(rows) == 2 * (1 + 3 * 2 * 2 + 2 * 2 * 2) and all(r["same_tokens"] for r in rows)
    assert {(r["budget"], r["drafter"]) for r in rows if r["budget_asked"] == "0.25"} == {(64, "streaming"),
                                                                                          (64, "snapkv")}
    assert all(len(r["speedups"]) == 2 and r["cached_prompt_share"] > 0 for r in rows)
    assert all(len(r["per_position"]) == 2 for r in rows if r["drafter"] != "plain" and r["gamma"] == "2")


def test_model_free_drafters_in_the_grid_and_the_trace(tiny_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """`magicdec bench` and `bench trace` take ngram, suffix and hybrid: the grid gives the model-free drafters
    no budget and no draft weights (hybrid keeps both, for its self-draft); the trace serves them on the engine
    with the reference's greedy outputs and no leaked block."""
    grid = Grid(drafters=["ngram", "suffix", "hybrid"], draft_weights=["full", "int8"], budgets=[64], gammas=[4])
    assert [c.label for c in grid.configs()] == ["self-ngram-g4", "self-suffix-g4", "self-hybrid-64-g4",
                                                 "self-hybrid-64-int8-g4"]
    from magicdec.bench.trace import read_results

    out = tmp_path / "trace"
    assert run_cli("trace", "--model", str(tiny_dir), "--corpus", str(corpus), "--requests", "3",
                   "--prompt-len", "100-200", "--output-len", "8", "--concurrency", "3",
                   "--configs", "plain", "ngram", "suffix", "hybrid", "--budget", "64", "--max-num-seqs", "3",
                   "--num-blocks", "32", "--quiet", "--out", str(out)) == 0
    _, _, summaries = read_results(out / "results.jsonl")
    assert [s["config"] for s in summaries] == ["plain", "ngram", "suffix", "hybrid"]
    assert all(s["matches_reference"] and s["no_leaks"] for s in summaries[1:]), summaries
