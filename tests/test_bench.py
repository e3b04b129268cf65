"""`magicdec bench` end to end on a tiny random model: files, record fields, synthetic labels, the
transformers peer, prefix prefill, argument parsing and PG-19 skipping."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from magicdec import LLM, Auto, SamplingParams
from magicdec.bench import Grid, prefix_batch, read_jsonl
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


def test_prefix_prefill_matches_fresh_prefill(tiny_llm: LLM) -> None:
    """Each context's first token comes from its own last prompt position: decoding from a stage of the
    prefix prefill gives what a fresh prefill of the prefixes gives."""
    g = random.Random(1)
    prompts = [[g.randrange(3, 384) for _ in range(96)] for _ in range(2)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    pre = prefix_batch(tiny_llm, prompts, params, max_gamma=4)
    for context in (40, 96):
        ours = tiny_llm.decode(pre.prefill(tiny_llm.model, tiny_llm.prefill_chunk, until=context).fork())
        fresh = tiny_llm.generate([p[:context] for p in prompts], params)
        assert [o.token_ids for o in ours.outputs] == [o.token_ids for o in fresh.outputs]
    with pytest.raises(ValueError):
        pre.prefill(tiny_llm.model, tiny_llm.prefill_chunk, until=50)


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
