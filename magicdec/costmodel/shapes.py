"""Known model shapes by name (no weights), and `resolve_model` for names or config.json paths.

Values are the published Hugging Face ``config.json`` fields of each checkpoint (base models).
Names are matched case-insensitively, with or without the organisation prefix
(``meta-llama/Llama-3.1-8B`` and ``llama-3.1-8b`` are the same shape).
"""

from __future__ import annotations

import json
from pathlib import Path

from magicdec.config import ModelConfig, RopeScaling

_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


def _gemma3(n_layers: int, query_pre_attn_scalar: int) -> dict[str, object]:
    """What Gemma 3's text decoders share: every sixth layer global (θ 1M, linear ×8), the others a 1024-token
    window (θ 10K); sandwich norms, GeGLU, √d embeddings, q/k norms, tied embeddings."""
    return dict(sliding_window=1024, layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding"
                                                       for i in range(n_layers)),
                rope_theta=1000000.0, rope_scaling=RopeScaling(rope_type="linear", factor=8.0),
                rope_local_theta=10000.0, rope_local_scaling=RopeScaling(), max_position_embeddings=131072,
                qk_norm="head", norm_placement="sandwich", hidden_act="gelu_pytorch_tanh",
                attn_scale=query_pre_attn_scalar ** -0.5, tie_word_embeddings=True, family="gemma3_text",
                bos_token_id=2, eos_token_ids=(1, 106))


def _gpt_oss(n_layers: int, n_experts: int) -> dict[str, object]:
    """What GPT-OSS-20B and -120B share: sliding (128 tokens) and global layers alternating, YaRN ×32, biases on
    q/k/v/o, top-4 routing over experts stored in MXFP4 (4-bit weights, an 8-bit scale per 32: 4.25 bits a weight;
    attention, router, embeddings and head in bf16). Its per-head attention sinks are a few bytes a layer."""
    return dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, n_layers=n_layers, n_heads=64,
                n_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=150000.0,
                rope_scaling=RopeScaling(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096,
                                         truncate=False),
                max_position_embeddings=131072, attention_bias=True, o_proj_bias=True, sliding_window=128,
                layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers)),
                n_experts=n_experts, n_experts_per_token=4, expert_weight_bits=4.25, family="gpt_oss",
                bos_token_id=199998, eos_token_ids=(200002,))


def _shape(name: str, **kw: object) -> ModelConfig:
    return ModelConfig(name=name, **kw)  # type: ignore[arg-type]


KNOWN_SHAPES: dict[str, ModelConfig] = {
    m.name.lower(): m
    for m in (
        # meta-llama/Llama-2-7b-hf
        _shape("Llama-2-7B", vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layers=32,
               n_heads=32, n_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
        # togethercomputer/LLaMA-2-7B-32K: Llama-2-7B with linear RoPE interpolation x8
        _shape("Llama-2-7B-32K", vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layers=32,
               n_heads=32, n_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
               rope_scaling=RopeScaling(rope_type="linear", factor=8.0), max_position_embeddings=32768,
               bos_token_id=1, eos_token_ids=(2,)),
        # meta-llama/Llama-3.1-8B
        _shape("Llama-3.1-8B", vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32,
               n_heads=32, n_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=RopeScaling(factor=8.0, **_LLAMA3_ROPE), max_position_embeddings=131072,
               bos_token_id=128000, eos_token_ids=(128001,)),
        # meta-llama/Llama-3.1-70B
        _shape("Llama-3.1-70B", vocab_size=128256, hidden_size=8192, intermediate_size=28672, n_layers=80,
               n_heads=64, n_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=RopeScaling(factor=8.0, **_LLAMA3_ROPE), max_position_embeddings=131072,
               bos_token_id=128000, eos_token_ids=(128001,)),
        # meta-llama/Llama-3.2-1B (tied embeddings, head_dim 64)
        _shape("Llama-3.2-1B", vocab_size=128256, hidden_size=2048, intermediate_size=8192, n_layers=16,
               n_heads=32, n_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=RopeScaling(factor=32.0, **_LLAMA3_ROPE), max_position_embeddings=131072,
               tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001,)),
        # TinyLlama/TinyLlama_v1.1
        _shape("TinyLlama-1.1B", vocab_size=32000, hidden_size=2048, intermediate_size=5632, n_layers=22,
               n_heads=32, n_kv_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
               bos_token_id=1, eos_token_ids=(2,)),
        # Qwen/Qwen2.5-7B (q/k/v biases; use_sliding_window is false)
        _shape("Qwen2.5-7B", vocab_size=152064, hidden_size=3584, intermediate_size=18944, n_layers=28,
               n_heads=28, n_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
               max_position_embeddings=131072, attention_bias=True, bos_token_id=151643,
               eos_token_ids=(151643,)),
        # mistralai/Mistral-7B-v0.1 (sliding window 4096)
        _shape("Mistral-7B", vocab_size=32000, hidden_size=4096, intermediate_size=14336, n_layers=32,
               n_heads=32, n_kv_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768,
               sliding_window=4096, bos_token_id=1, eos_token_ids=(2,)),
        # mistralai/Mistral-7B-v0.3 (no sliding window, larger vocab and RoPE base)
        _shape("Mistral-7B-v0.3", vocab_size=32768, hidden_size=4096, intermediate_size=14336, n_layers=32,
               n_heads=32, n_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
               max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,)),
        # HuggingFaceTB/SmolLM2-135M (tied embeddings, head_dim 64)
        _shape("SmolLM2-135M", vocab_size=49152, hidden_size=576, intermediate_size=1536, n_layers=30,
               n_heads=9, n_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
               max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_ids=(0,)),
        # Qwen/Qwen3-8B (q/k RMSNorm per head)
        _shape("Qwen3-8B", vocab_size=151936, hidden_size=4096, intermediate_size=12288, n_layers=36, n_heads=32,
               n_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
               qk_norm="head", family="qwen3", bos_token_id=151643, eos_token_ids=(151645,)),
        # Qwen/Qwen3-32B
        _shape("Qwen3-32B", vocab_size=151936, hidden_size=5120, intermediate_size=25600, n_layers=64, n_heads=64,
               n_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
               qk_norm="head", family="qwen3", bos_token_id=151643, eos_token_ids=(151645,)),
        # google/gemma-3-12b-pt (text): five sliding layers (window 1024) for each global one
        _shape("Gemma-3-12B", vocab_size=262208, hidden_size=3840, intermediate_size=15360, n_layers=48, n_heads=16,
               n_kv_heads=8, head_dim=256, rms_norm_eps=1e-6, **_gemma3(48, 256)),
        # google/gemma-3-27b-pt (text)
        _shape("Gemma-3-27B", vocab_size=262208, hidden_size=5376, intermediate_size=21504, n_layers=62, n_heads=32,
               n_kv_heads=16, head_dim=128, rms_norm_eps=1e-6, **_gemma3(62, 168)),
        # mistralai/Ministral-8B-Instruct-2410: one global layer, then three of a 32K window (its params.json)
        _shape("Ministral-8B", vocab_size=131072, hidden_size=4096, intermediate_size=12288, n_layers=36, n_heads=32,
               n_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=100000000.0, max_position_embeddings=32768,
               sliding_window=32768, layer_types=tuple("full" if i % 4 == 0 else "sliding" for i in range(36)),
               family="ministral", bos_token_id=1, eos_token_ids=(2,)),
        # microsoft/Phi-4-mini-instruct: partial rotary (¾ of each head); its LongRoPE factors are left out (the
        # cost model does not read RoPE)
        _shape("Phi-4-mini", vocab_size=200064, hidden_size=3072, intermediate_size=8192, n_layers=32, n_heads=24,
               n_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=131072,
               rotary_dim=96, tie_word_embeddings=True, family="phi3", bos_token_id=199999,
               eos_token_ids=(199999,)),
        # ---- mixtures of experts ----
        # Qwen/Qwen3-30B-A3B: 128 experts of width 768, top-8, on every layer (mlp_only_layers empty)
        _shape("Qwen3-30B-A3B", vocab_size=151936, hidden_size=2048, intermediate_size=6144, n_layers=48, n_heads=32,
               n_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
               qk_norm="head", n_experts=128, n_experts_per_token=8, moe_intermediate_size=768, family="qwen3_moe",
               bos_token_id=151643, eos_token_ids=(151645,)),
        # openai/gpt-oss-20b and openai/gpt-oss-120b
        _shape("GPT-OSS-20B", **_gpt_oss(24, 32)),
        _shape("GPT-OSS-120B", **_gpt_oss(36, 128)),
        # mistralai/Mixtral-8x7B-v0.1: 8 experts of width 14336, top-2, no sliding window
        _shape("Mixtral-8x7B", vocab_size=32000, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
               n_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768, n_experts=8,
               n_experts_per_token=2, family="mixtral", bos_token_id=1, eos_token_ids=(2,)),
    )
}
# Other spellings people use for the same checkpoints.
_ALIASES = {
    "meta-llama-3.1-8b": "llama-3.1-8b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama-3.1-70b-instruct": "llama-3.1-70b",
    "llama-3.2-1b-instruct": "llama-3.2-1b",
    "llama-2-7b-hf": "llama-2-7b",
    "llama-2-7b-32k-instruct": "llama-2-7b-32k",
    "tinyllama_v1.1": "tinyllama-1.1b",
    "qwen2.5-7b-instruct": "qwen2.5-7b",
    "mistral-7b-v0.1": "mistral-7b",
    "smollm2-135m-instruct": "smollm2-135m",
    "gemma-3-12b-pt": "gemma-3-12b", "gemma-3-12b-it": "gemma-3-12b",
    "gemma-3-27b-pt": "gemma-3-27b", "gemma-3-27b-it": "gemma-3-27b",
    "ministral-8b-instruct-2410": "ministral-8b",
    "phi-4-mini-instruct": "phi-4-mini",
    "qwen3-30b-a3b-instruct-2507": "qwen3-30b-a3b", "qwen3-30b-a3b-base": "qwen3-30b-a3b",
    "gpt-oss-20b-bf16": "gpt-oss-20b",
    "mixtral-8x7b-v0.1": "mixtral-8x7b", "mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
}


def known_model_names() -> list[str]:
    return [m.name for m in KNOWN_SHAPES.values()]


def resolve_model(name_or_path: str | Path) -> ModelConfig:
    """A known shape by name, or the shape in an HF ``config.json`` (file or directory holding one)."""
    raw = str(name_or_path).strip()
    key = raw.lower().rsplit("/", 1)[-1] if not Path(raw).exists() else ""
    key = _ALIASES.get(key, key)
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    path = Path(raw)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        with path.open() as fh:
            cfg = json.load(fh)
        return ModelConfig.from_hf(cfg, name=cfg.get("_name_or_path") or path.parent.name)
    raise ValueError(
        f"unknown model {raw!r}; known shapes: {', '.join(known_model_names())} "
        "(or a path to an HF config.json or a directory containing one)"
    )
