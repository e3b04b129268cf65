"""Checkpoint variants built by transformers itself (its config classes, random weights, `save_pretrained`):
magicdec's greedy output must be transformers' greedy output, token for token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import full_logits, hf_greedy, random_prompts, save_sharp, spawn_ranks
from magicdec import LLM, SamplingParams
from magicdec.parallel.tp import TensorParallel

BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
# prompts of 90 tokens + 16 new ones: beyond the original context (64) of the scaled RoPE variants
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_attention_bias": ("llama", {"attention_bias": True}),  # q, k, v and o_proj biases
    "llama3_rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                                  "rope_theta": 500000.0}}),
    "yarn": ("llama", {"rope_parameters": YARN, "max_position_embeddings": 256}),
    "yarn_params": ("llama", {"rope_parameters": {**YARN, "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                                                  "attention_factor": 1.3, "truncate": False},
                              "max_position_embeddings": 512}),
    "yarn_mscale": ("qwen2", {"rope_parameters": {**YARN, "mscale": 2.0, "mscale_all_dim": 1.0},
                              "max_position_embeddings": 256}),
    "head_dim_80": ("llama", {"hidden_size": 160, "num_attention_heads": 2, "num_key_value_heads": 1}),
    "mha": ("llama", {"num_key_value_heads": 4}),
    "mqa": ("llama", {"num_key_value_heads": 1}),
    "mistral": ("mistral", {"sliding_window": 4096}),
    "qwen2": ("qwen2", {}),
}


def write_hf_checkpoint(path: Path, model_type: str, overrides: dict[str, Any], seed: int = 0) -> Path:
    """A random model of transformers' own config class for `model_type`, saved with `save_pretrained`.
    Every parameter is drawn at random (biases and norms too, so that each one matters to the output)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    return save_sharp(config_class(**{**BASE, **overrides}), path, seed)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_equals_transformers(variant: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = write_hf_checkpoint(tmp_path / variant, *VARIANTS[variant])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = LLM(path, device="cpu")
    prompts = random_prompts(2, [90, 23], ours.config.vocab_size, seed=7)
    result = ours.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, result.outputs):
        assert out.token_ids == hf_greedy(hf, prompt, 16), variant


def tp_worker(rank: int, world: int, path: str, result: str) -> None:
    llm = LLM(path, device="cpu", tp=TensorParallel(rank, world))
    ids = torch.tensor(random_prompts(2, [40], llm.config.vocab_size, seed=5))
    logits = full_logits(llm.model, ids)
    if rank == 0:
        torch.save(logits, result)


def test_output_bias_under_tensor_parallelism(tmp_path: Path) -> None:
    """o_proj's bias is added once, after the all-reduce of the ranks' partial outputs, not once per rank."""
    from transformers import AutoModelForCausalLM

    path = write_hf_checkpoint(tmp_path / "bias", "llama", {"attention_bias": True})
    spawn_ranks(tp_worker, 2, str(path), str(tmp_path / "logits.pt"))
    ids = torch.tensor(random_prompts(2, [40], BASE["vocab_size"], seed=5))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
    assert (torch.load(tmp_path / "logits.pt") - ref).abs().max() <= 1e-4
