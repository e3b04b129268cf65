"""Mixtures of experts in the one decoder (issue 26): Qwen3-MoE (a dense layer among sparse ones), Qwen2-MoE
(a gated shared expert), Mixtral (a sliding window), OLMoE (q/k norms over all heads) and GPT-OSS (attention
sinks, alternating sliding and full layers, the router's bias and softmax after top-k, the clamped SwiGLU with
biases) as tiny random checkpoints saved by transformers' own config classes: magicdec's greedy tokens are
transformers', speculation gives plain decoding's tokens, and the MoE forward is batch-invariant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import hf_greedy, random_prompts, save_sharp
from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig

WINDOW = 32
BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, num_experts_per_tok=2)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "moe_intermediate_size": 32, "mlp_only_layers": [1],
                                     "norm_topk_prob": True}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "sliding_window": WINDOW}),
    "olmoe": ("OlmoeConfig", {"num_experts": 8}),
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "sliding_window": WINDOW, "num_hidden_layers": 2,
                                 "layer_types": ["sliding_attention", "full_attention"],
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
}
# the router's logits (and GPT-OSS's sinks) larger than the other weights: decisive routing, sinks that matter
SCALES = {"gate.weight": 4.0, "router.weight": 4.0, "sinks": 10.0}


def write_moe(path: Path, family: str, seed: int = 0, **changes: Any) -> Path:
    import transformers

    name, overrides = FAMILIES[family]
    config = getattr(transformers, name)(**{**BASE, **overrides, **changes})
    return save_sharp(config, path, seed, scales=SCALES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {f: write_moe(root / f, f) for f in FAMILIES}


PROMPTS = random_prompts(3, [70, 23, 45], 384, seed=7)  # the first past the window (32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers(family: str, checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    path = checkpoints[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = LLM(path, device="cpu")
    assert ours.config.n_experts == FAMILIES[family][1].get("num_experts", FAMILIES[family][1].get("num_local_experts"))
    result = ours.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, result.outputs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), (family, len(prompt))
