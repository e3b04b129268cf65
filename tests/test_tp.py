"""Tensor parallelism on the CPU with gloo, ranks spawned inside pytest: logits, greedy plain and
speculative tokens equal one process's; SmolLM2 (3 KV heads) runs on 3 ranks under torchrun and is
refused on 2 with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, full_logits, random_prompts, spawn_ranks, tiny_config, write_checkpoint, write_gguf
from magicdec import LLM, Auto, DraftTuning, SamplingParams, SpecConfig
from magicdec.costmodel.policy import StepReport
from magicdec.parallel.tp import RankZeroGamma, TensorParallel, check_shardable

SPECS = {
    "plain": None,
    "self-streaming": SpecConfig(method="self", budget=24, sinks=4, gamma=3),
    "self-snapkv": SpecConfig(method="self", drafter="snapkv", budget=24, tuning=DraftTuning(snapkv_window=8), gamma=2),
    # each rank times its own steps; rank 0's choice of γ is the one every rank runs
    "self-auto": SpecConfig(method="self", budget=24, sinks=4, gamma=Auto(profile="cpu")),
    # model-free drafts: every rank proposes from the same tokens; hybrid's per-round choice is rank 0's
    "ngram": SpecConfig(method="self", drafter="ngram", gamma=4),
    "suffix": SpecConfig(method="self", drafter="suffix", gamma=4),
    "hybrid": SpecConfig(method="self", drafter="hybrid", budget=24, sinks=4, gamma=Auto(max_gamma=4, profile="cpu")),
}


def run_all(llm: LLM, draft: str) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(3, llm.config.vocab_size, (2, 37))
    logits = full_logits(llm.model, ids)
    prompts = [p + p[3:15] for p in random_prompts(3, [50, 17, 33], llm.config.vocab_size, seed=5)]  # quoted back
    out = {"logits": logits}
    specs = dict(SPECS, draft=SpecConfig(method="draft", drafter="streaming", budget=20, sinks=2, draft_model=draft))
    for name, spec in specs.items():
        r = llm.generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True), spec)
        out[name] = [o.token_ids for o in r.outputs]
    sampled = llm.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True),
                           specs["self-streaming"])
    out["sampled"] = [o.token_ids for o in sampled.outputs]
    return out


def worker(rank: int, world: int, target: str, draft: str, draft_tp: str, result: str) -> None:
    llm = LLM(target, device="cpu", tp=TensorParallel(rank, world), draft_tp=draft_tp)
    out = run_all(llm, draft)
    if rank == 0:
        torch.save(out, result)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    target = write_checkpoint(tmp_path_factory.mktemp("tp-target"), tiny_config(n_heads=4, n_kv_heads=2), seed=7)
    draft = write_checkpoint(tmp_path_factory.mktemp("tp-draft"),
                             tiny_config(n_layers=1, hidden_size=32, n_heads=2, n_kv_heads=2, intermediate_size=64),
                             seed=8)
    return target, draft


@pytest.mark.parametrize("draft_tp", ["sharded", "replicated"])
def test_two_ranks_match_one_process(models: tuple[Path, Path], tmp_path: Path, draft_tp: str) -> None:
    target, draft = models
    single = run_all(LLM(target, device="cpu"), str(draft))
    result = tmp_path / "rank0.pt"
    spawn_ranks(worker, 2, str(target), str(draft), draft_tp, str(result))
    sharded = torch.load(result)
    assert (sharded["logits"] - single["logits"]).abs().max() <= 1e-4
    for name in (*SPECS, "draft", "sampled"):
        assert sharded[name] == single[name], name


class RankGamma:
    """A policy that would run a different γ on every rank (as timing noise can make a real one do)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.seen: list[int] = []

    def choose(self, state: object) -> int:
        return self.rank + 2

    def observe(self, report: StepReport) -> None:
        self.seen.append(report.gamma)


def choose_worker(rank: int, world: int, result: str) -> None:
    shared = RankZeroGamma(RankGamma(rank), TensorParallel(rank, world), torch.device("cpu"))
    chosen = [shared.choose(None) for _ in range(3)]
    shared.observe(StepReport(["r"], [chosen[0]], [1]))
    torch.save({"chosen": chosen, "seen": shared.policy.seen}, f"{result}.{rank}")


def test_every_rank_runs_rank_zeros_gamma(tmp_path: Path) -> None:
    spawn_ranks(choose_worker, 3, str(tmp_path / "r"), timeout_s=60)
    for rank in range(3):
        assert torch.load(tmp_path / f"r.{rank}") == {"chosen": [2, 2, 2], "seen": [2]}


def test_uneven_split_is_refused_with_the_fix() -> None:
    cfg = tiny_config(hidden_size=576, n_heads=9, n_kv_heads=3, intermediate_size=1536, vocab_size=49152)
    with pytest.raises(ValueError, match=r"3 KV heads are not divisible by 2.*world size of 1, 3"):
        check_shardable(cfg, 2)


@pytest.mark.slow
def test_smollm2_under_torchrun_with_three_ranks_gives_one_process_tokens() -> None:
    args = ["-m", "magicdec", "generate", "--json", "--max-new-tokens", "12", "--spec", "self", "--budget", "32",
            "--sinks", "4", "--prompt", "The lighthouse keeper counted the gulls twice each morning, because"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port",
                str(free_port())]
    three = subprocess.run([*torchrun, *args], capture_output=True, text=True, env=env, timeout=600)
    assert three.returncode == 0, three.stderr[-2000:]
    tokens = [o["token_ids"] for o in json.loads(three.stdout)["outputs"]]
    assert tokens == [o["token_ids"] for o in json.loads(one.stdout)["outputs"]]
    two = subprocess.run([*torchrun[:4], "2", "--master-port", str(free_port()), *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert two.returncode != 0 and "3 KV heads are not divisible by 2" in two.stderr


def tied_run(llm: LLM) -> dict:
    """Logits of a random batch, and greedy plain and self-speculative tokens."""
    torch.manual_seed(0)
    ids = torch.randint(3, llm.config.vocab_size, (2, 29))
    out: dict = {"logits": full_logits(llm.model, ids)}
    prompts = random_prompts(2, [40, 21], llm.config.vocab_size, seed=9)
    for name in ("plain", "self-streaming"):
        r = llm.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True), SPECS[name])
        out[name] = [o.token_ids for o in r.outputs]
    return out


def tied_worker(rank: int, world: int, gguf_path: str, hf_dir: str, conv: str, result: str) -> None:
    from magicdec.loading import LoadedModel, Tokenizer
    from magicdec.loading.gguf_file import load_gguf

    tp = TensorParallel(rank, world)
    runs = {}
    # too large to convert (the whole model is read, then cut); converting (the same); from the conversion
    # (only this rank's slices are read)
    for name, limit in (("too-large", 0), ("converting", 1 << 30), ("converted", 1 << 30)):
        model, cfg = load_gguf(Path(gguf_path), torch.float32, "cpu", Path(f"{conv}-{rank}"), limit, tp)
        loaded = LoadedModel(model, Tokenizer.from_dir(Path(hf_dir)), cfg, Path(gguf_path))
        runs[name] = tied_run(LLM(loaded=loaded, tp=tp))
    if rank == 0:
        torch.save(runs, result)


def test_tied_model_loaded_whole_then_sharded_gives_one_process_tokens(tmp_path: Path) -> None:
    cfg = tiny_config(n_layers=2, tie_word_embeddings=True)
    hf_dir = write_checkpoint(tmp_path / "tied", cfg, seed=11)
    path = write_gguf(tmp_path / "tied.gguf", hf_dir)
    single = tied_run(LLM(hf_dir, device="cpu"))
    result = tmp_path / "rank0.pt"
    spawn_ranks(tied_worker, 2, str(path), str(hf_dir), str(tmp_path / "conv"), str(result))
    for name, sharded in torch.load(result).items():
        assert (sharded["logits"] - single["logits"]).abs().max() <= 1e-4, name
        assert sharded["plain"] == single["plain"] and sharded["self-streaming"] == single["self-streaming"], name


FAILING_RANK = """
import atexit, sys, time, torch, torch.distributed as dist
import magicdec.cli.generate as generate
from magicdec.cli.main import main
from magicdec.parallel.tp import init_from_env

def run(args):
    tp = init_from_env("cpu")
    if tp.rank == {failing}:
        atexit.register(time.sleep, 300)  # this rank's teardown hangs, as a process group's can (NCCL)
        raise {kind}("rank {failing} has no memory left for its KV cache")
    dist.all_reduce(torch.zeros(1))  # the other rank waits here
    return 0

generate.run = run
sys.exit(main(["generate", "--prompt", "x"]))
"""


# a failure the CLI says (on rank 1, a rank that reaches the store hosted by rank 0), and an uncaught one
# (on rank 0, the rank that hosts the store outside torchrun)
@pytest.mark.parametrize(("kind", "failing"), [("MemoryError", 1), ("RuntimeError", 0)])
def test_a_failing_rank_stops_the_others_with_its_error(kind: str, failing: int) -> None:
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    script = FAILING_RANK.format(kind=kind, failing=failing)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 90
    while len(ended) < 2 and time.monotonic() < deadline:
        ended.update({r: time.monotonic() for r, p in enumerate(procs) if r not in ended and p.poll() is not None})
        time.sleep(0.1)
    for p in procs:
        p.kill()
    errors = [p.communicate()[1] for p in procs]
    other = 1 - failing
    assert len(ended) == 2, f"ranks {sorted(set(range(2)) - set(ended))} never ended:\n{errors[other][-2000:]}"
    assert abs(ended[0] - ended[1]) < 10
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    said = f"rank {failing} failed: {kind}: rank {failing} has no memory left for its KV cache"
    assert said in errors[other], errors[other][-2000:]


def engine_trace(llm: LLM) -> dict[str, list[list[int]]]:
    """A small trace through the serving engine: staggered arrivals, a preemption, a prefix hit."""
    from magicdec import Engine

    prompts = random_prompts(5, [200, 60, 330, 129, 90], llm.config.vocab_size, seed=12)
    prompts[3] = prompts[2][:256] + prompts[3]
    out = {}
    for name in ("plain", "self-streaming"):
        engine = Engine(llm=llm, spec=SPECS[name], prefill_chunk=128, max_num_batched_tokens=256, num_blocks=14,
                        quiet=True)
        ids, step = [], 0
        while len(ids) < len(prompts) or engine.has_unfinished_requests():
            if step < len(prompts):
                ids.append(engine.add_request(prompts[step], SamplingParams(max_new_tokens=20, ignore_eos=True)))
            done = {o.request_id: o.token_ids for o in engine.step() if o.finished}
            out.setdefault(name, {}).update(done)
            step += 1
        engine.check_no_leaks()
        out[name] = [out[name][i] for i in ids]
        out[name + "-preempted"] = engine.core.scheduler.preemptions
    return out


def engine_worker(rank: int, world: int, target: str, result: str) -> None:
    out = engine_trace(LLM(target, device="cpu", tp=TensorParallel(rank, world)))
    torch.save(out, f"{result}.{rank}")


def test_serving_engine_under_two_ranks_gives_one_process_tokens(models: tuple[Path, Path], tmp_path: Path) -> None:
    """Every rank runs the same steps (the scheduler is deterministic; γ comes from rank 0): the tokens of
    a trace with a preemption and a prefix hit are one process's."""
    target, _ = models
    single = engine_trace(LLM(target, device="cpu"))
    spawn_ranks(engine_worker, 2, str(target), str(tmp_path / "r"))
    for rank in range(2):
        assert torch.load(tmp_path / f"r.{rank}") == single
    assert single["plain-preempted"] > 0
