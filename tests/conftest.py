"""Shared fixtures: small random checkpoints written in Hugging Face format (so the real loader is
exercised), the real built-in SmolLM2, and the transformers oracle for both."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from magicdec import LLM
from magicdec.bench.corpora import Corpus, CorpusError, load_austen
from magicdec.cache.paged import PagedKVCache, PagedView
from magicdec.config import ModelConfig
from magicdec.kernels import cpu
from magicdec.loading.random_init import word_vocabulary

logging.getLogger("transformers").setLevel(logging.ERROR)

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=160, n_layers=3, n_heads=4, n_kv_heads=2,
            max_position_embeddings=4096, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,))


def tiny_config(**overrides: Any) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def write_checkpoint(path: Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """A random transformers model with `cfg`'s shape, saved as a Hugging Face directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf_cfg = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init: peakier, more decisive distributions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    word_vocabulary(cfg.vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2", "bos_token": "w1"}))
    return path


def hf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def kernels() -> None:
    """The CPU kernels, built (or the test is skipped, saying why)."""
    try:
        cpu.build()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture
def threads() -> Iterator[None]:
    """Restores the thread count that a test changes."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config())


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir: Path) -> LLM:
    return LLM(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def smol() -> LLM:
    return LLM(device="cpu")


@pytest.fixture(scope="session")
def austen() -> Corpus:
    """The Jane Austen corpus (`make corpus`); without it a test that needs it fails, naming the fix."""
    try:
        return load_austen()
    except CorpusError as exc:
        pytest.fail(f"the Jane Austen corpus is required: {exc}")


@pytest.fixture(scope="session")
def hf_smol() -> Any:
    """transformers' own GGUF loader and dequantization, as an independent oracle."""
    from transformers import AutoModelForCausalLM

    from magicdec.loading import builtin_model_path

    p = builtin_model_path()
    return AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()


def random_prompts(n: int, lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


class PagedRows:
    """A paged KV pool in which each of `rows` rows holds blocks of its own, in order, for `capacity` positions:
    the plain cache a test's forwards run over (`rows(ids, positions)` → logits)."""

    def __init__(self, model: Any, rows: int, capacity: int, block_size: int = 64) -> None:
        n = -(-capacity // block_size)
        self.model = model
        self.cache = PagedKVCache.for_model(model, rows * n, block_size)
        self.view = PagedView(self.cache, self.cache.table([list(range(r * n, (r + 1) * n)) for r in range(rows)]))

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, **kw: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(ids, positions, self.view, **kw)


def full_logits(model: Any, ids: torch.Tensor | list[list[int]]) -> torch.Tensor:
    """One forward over whole equal-length sequences [B, T] from position 0, on a fresh paged cache."""
    x = torch.as_tensor(ids)
    B, T = x.shape
    return PagedRows(model, B, T)(x, torch.arange(T).expand(B, -1))


def hf_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    return out[0, len(prompt):].tolist()


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first EOS (what a generation that stops at EOS returns)."""
    cut = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if cut is None else tokens[: cut + 1]


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight", "self_attn.v_proj.bias": "attn_v.bias",
              "self_attn.o_proj.bias": "attn_output.bias"}


def write_gguf(path: Path, hf_dir: Path, rope: dict[str, Any] | None = None,
               extra: dict[str, np.ndarray] | None = None) -> Path:
    """The float32 GGUF llama.cpp's converter would write for a Hugging Face Llama checkpoint (q/k rows,
    biases too, permuted for its interleaved RoPE), with `rope` metadata ({"scaling.type": ..., ...}) and
    `extra` tensors."""
    import gguf

    cfg = ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))
    t = load_file(hf_dir / "model.safetensors")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_eos_token_id(2)
    for key, value in (rope or {}).items():
        if isinstance(value, str):
            w.add_string(f"llama.rope.{key}", value)
        elif isinstance(value, int):
            w.add_uint32(f"llama.rope.{key}", value)
        else:
            w.add_float32(f"llama.rope.{key}", value)

    def perm(x: torch.Tensor, heads: int) -> np.ndarray:
        a = x.numpy()
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", t["model.norm.weight"].numpy())
    if "lm_head.weight" in t:
        w.add_tensor("output.weight", t["lm_head.weight"].numpy())
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for hf, gg in GGUF_NAMES.items():
            if p + hf in t:
                w.add_tensor(f"blk.{i}.{gg}", t[p + hf].numpy())
        for x, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
            for kind in ("weight", "bias"):
                if f"{p}self_attn.{x}_proj.{kind}" in t:
                    w.add_tensor(f"blk.{i}.attn_{x}.{kind}", perm(t[f"{p}self_attn.{x}_proj.{kind}"], heads))
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable[..., None], world: int, port: int, timeout_s: float, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))  # a rank left waiting fails the test, not hangs it
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears the group down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # A rank that succeeded ends here, without the interpreter's teardown: gloo's and the store's threads
    # can abort the process there ("terminate called without an active exception", a torch race at exit
    # seen once in CI), which would fail a test whose work was done. An exception still propagates to
    # mp.spawn, which reports it with its traceback.
    os._exit(0)


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 120) -> None:
    """Run `fn(rank, world, *args)` on `world` CPU ranks joined in a gloo process group; raise if one fails."""
    mp.spawn(_rank_main, args=(fn, world, free_port(), timeout_s, args), nprocs=world, join=True)


def save_sharp(config: Any, path: Path, seed: int = 0, norms: tuple[float, float] = (0.8, 1.2),
               scales: dict[str, float] | None = None) -> Path:
    """A transformers model of `config` with large random weights (with the default init greedy tokens repeat
    one), norm weights drawn from `norms`, saved with `save_pretrained` beside a word tokenizer. `scales`: a
    parameter whose name ends with a key is multiplied by its value (e.g. a MoE router's, so that ties between
    experts are rare)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(*norms)
            else:
                p.normal_(0, 0.12 if p.dim() > 1 else 0.1)
            for suffix, factor in (scales or {}).items():
                if name.endswith(suffix):
                    p.mul_(factor)
    model.save_pretrained(path, safe_serialization=True)
    word_vocabulary(config.vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2", "bos_token": "w1"}))
    return path


def gguf_writer(path: Path, hf_dir: Path, arch: str) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """A `gguf.GGUFWriter` for `arch` at `path` holding the metadata every llama.cpp conversion writes, from the
    checkpoint in `hf_dir`; with the checkpoint's config and tensors."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_eos_token_id(2)
    return w, cfg, load_file(hf_dir / "model.safetensors")


def check_self_draft_is_plain(llm: LLM, drafter: dict[str, Any], weights: str, max_new_tokens: int) -> None:
    """Self-speculation (γ 3, the drafter's settings, `weights` "full" or "int8") gives plain decoding's greedy
    tokens on three prompts (200, 23 and 90 tokens), and speculates."""
    from magicdec import SamplingParams, SpecConfig

    prompts = random_prompts(3, [200, 23, 90], 384, seed=3)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    plain = [o.token_ids for o in llm.generate(prompts, params).outputs]
    result = llm.generate(prompts, params, SpecConfig(method="self", gamma=3, draft_weights=weights, **drafter))
    assert [o.token_ids for o in result.outputs] == plain, (drafter, weights)
    assert result.stats.acceptance.rounds > 0
