"""The model against Hugging Face transformers, and its own consistency over the paged cache: incremental
decoding, chunked prefill and ragged batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import conftest
from conftest import PagedRows, hf_model, random_prompts, tiny_config, write_checkpoint
from magicdec import LLM
from magicdec.config import RopeScaling

VARIANTS = {
    "llama_default_rope": {},
    "llama_linear_rope": {"rope_scaling": RopeScaling("linear", factor=4.0)},
    "llama3_rope": {"rope_scaling": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=256), "rope_theta": 500000.0},
    "qwen2_bias": {"attention_bias": True},
    "llama_attention_bias": {"attention_bias": True, "o_proj_bias": True},
    "yarn_rope": {"rope_scaling": RopeScaling("yarn", factor=4.0, original_max_position_embeddings=128)},
    "yarn_rope_params": {"rope_scaling": RopeScaling("yarn", factor=8.0, original_max_position_embeddings=64,
                                                     beta_fast=16.0, beta_slow=2.0, attention_factor=1.2,
                                                     truncate=False)},
    "tied_embeddings": {"tie_word_embeddings": True},
    "mqa": {"n_kv_heads": 1},
    "mha_head_dim_override": {"n_kv_heads": 4, "head_dim": 32},
}


def full_logits(llm: LLM, ids: list[list[int]]) -> torch.Tensor:
    """One forward over whole (equal-length) sequences."""
    return conftest.full_logits(llm.model, ids)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant: str, tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, tiny_config(**VARIANTS[variant]), seed=3)
    ours = LLM(path, device="cpu")
    ids = random_prompts(2, [300], ours.config.vocab_size, seed=1)  # beyond the llama3 original context
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor(ids)).logits
    diff = (full_logits(ours, ids) - ref).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max |Δlogit| = {diff}"


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smol: LLM, hf_smol) -> None:
    text = "Mr. Bennet was among the earliest of those who waited on Mr. Bingley. He had always intended to visit"
    ids = [smol.tokenizer.encode(text)]
    with torch.no_grad():
        ref = hf_smol(torch.tensor(ids)).logits
    diff = (full_logits(smol, ids) - ref).abs().max().item()
    assert diff <= 1e-4, f"max |Δlogit| = {diff}"


def test_incremental_decoding_equals_full_forward(tiny_llm: LLM) -> None:
    ids = random_prompts(1, [40], tiny_llm.config.vocab_size, seed=5)[0]
    full = full_logits(tiny_llm, [ids])[0]
    rows = PagedRows(tiny_llm.model, 1, 64)
    steps = [rows(torch.tensor([ids[:25]]), torch.arange(25)[None])[0]]
    for p in range(25, 40):
        steps.append(rows(torch.tensor([[ids[p]]]), torch.tensor([[p]]))[0])
    assert (torch.cat(steps) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_prefill_equals_one_forward(tiny_llm: LLM, chunk: int) -> None:
    """A prompt put into the paged cache in chunks (each a forward of its own, as the engine prefills) gives
    the last logits of one forward over the whole prompt."""
    lengths = [90, 61, 33, 5]
    prompts = random_prompts(4, lengths, tiny_llm.config.vocab_size, seed=2)
    for p in prompts:
        rows = PagedRows(tiny_llm.model, 1, 100)
        for start in range(0, len(p), chunk):
            end = min(start + chunk, len(p))
            last = rows(torch.tensor([p[start:end]]), torch.arange(start, end)[None])[0, -1]
        alone = full_logits(tiny_llm, [p])[0, -1]
        assert (last - alone).abs().max() <= 1e-5, f"length {len(p)}"


def test_ragged_batch_generation_equals_sequences_alone(tiny_llm: LLM) -> None:
    from magicdec import SamplingParams

    prompts = random_prompts(3, [50, 7, 23], tiny_llm.config.vocab_size, seed=9)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batch = tiny_llm.generate(prompts, params).outputs
    for p, out in zip(prompts, batch):
        assert tiny_llm.generate([p], params).outputs[0].token_ids == out.token_ids
