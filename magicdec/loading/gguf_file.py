"""GGUF files (llama.cpp's format), read with the `gguf` package and dequantized to float.

llama.cpp's converter permutes the rows of q_proj and k_proj (for its interleaved RoPE) in Llama
checkpoints; we undo that so the weights are in Hugging Face's rotate-half layout again. Llama-3
RoPE scaling travels as an explicit `rope_freqs` tensor of per-pair divisors.

Reading and dequantizing a GGUF file takes seconds (the `gguf` reader parses every vocabulary entry),
so small models are converted once into a Hugging Face-style directory under
`$MAGICDEC_HOME/gguf/` (config.json, float32 model.safetensors, tokenizer files) and loaded from
there by the ordinary safetensors loader (`magicdec.loading.conversion`: one process converts,
concurrent ones wait). Mixtures of experts (their metadata, routers and stacked experts): `gguf_experts`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magicdec.config import FAMILY_TRAITS, ConfigError, ModelConfig, RopeScaling
from magicdec.loading.assemble import PLUS_ONE_NORMS, build_model, expected_shapes
from magicdec.loading.conversion import convert_once, damage
from magicdec.loading.errors import LoadError
from magicdec.loading.gguf_experts import (
    SHARED_EXPERT_NAMES,
    as_float32,
    expert_fields,
    expert_tensors,
    is_expert_tensor,
)
from magicdec.model.llama import Transformer
from magicdec.parallel.tp import TensorParallel

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "granite", "phi3", "qwen3moe", "olmoe",
                 "smollm3", "qwen2moe", "gpt-oss")
PERMUTED = ("llama", "granite", "smollm3")  # llama.cpp's converter permutes q/k rows for these (its LlamaModel's rule)
# a GGUF architecture → the family (Hugging Face model_type) it translates to
FAMILIES = {"gemma3": "gemma3_text", "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "gpt-oss": "gpt_oss"}
# the models whose "27B" size llama.cpp scales attention by hidden/heads instead of head_dim (layers → family)
_SCALE_BY_HIDDEN = {46: "gemma2", 62: "gemma3_text"}
_LAYER_NAMES = {
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_FUSED_NAMES = {  # Phi-3's fused projections, as llama.cpp keeps them
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # read as metadata
# what an architecture names differently: GPT-OSS's pre-MLP norm and its sinks, Qwen2-MoE's shared expert
_ARCH_NAMES = {
    "gpt-oss": {"post_attention_layernorm.weight": "post_attention_norm.weight",
                "self_attn.sinks": "attn_sinks.weight"},
    "qwen2moe": SHARED_EXPERT_NAMES,
}
# the sliding/global alternation llama.cpp fixes per architecture without a sliding_window_pattern key: every n-th
# layer global (GPT-OSS: its set_swa_pattern(2), sliding layers first)
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gpt-oss": 2}
# norms by where the family puts them
_NORM_NAMES = {
    "pre": {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"},
    "sandwich": {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "post_attention_norm.weight",
                 "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
    "post": {"post_attention_layernorm.weight": "post_attention_norm.weight",
             "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def open_gguf(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise LoadError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on corrupt files
        raise LoadError(f"{path} is not a readable GGUF file: {e}") from None


def field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader: Any, path: Path) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise LoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; magicdec runs {', '.join(ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise LoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    n_heads = int(need("attention.head_count"))
    context = int(field(reader, f"{arch}.context_length", 4096))
    def floats(name: str) -> tuple[float, ...]:
        return tuple(float(x) for x in np.asarray(tensors[name].data, dtype=np.float32))

    try:
        if "rope_factors_long.weight" in tensors:  # Phi-3's LongRoPE
            original = int(field(reader, f"{arch}.rope.scaling.original_context_length") or context)
            attn = field(reader, f"{arch}.rope.scaling.attn_factor")
            scaling = RopeScaling("longrope", factor=context / original, original_max_position_embeddings=original,
                                  short_factor=floats("rope_factors_short.weight"),
                                  long_factor=floats("rope_factors_long.weight"),
                                  attention_factor=None if attn is None else float(attn))
        else:
            scaling = _rope_scaling(reader, arch, context)
        if arch == "gpt-oss" and scaling.rope_type == "yarn":
            # GPT-OSS's YaRN ramp keeps fractional bounds (transformers' truncate=False, OpenAI's reference);
            # llama.cpp rounds them for every model, and a GGUF file has no key for it: we run the model's own
            scaling = replace(scaling, truncate=False)
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    if "rope_freqs.weight" in tensors:
        scaling = RopeScaling("llama3", freq_factors=floats("rope_freqs.weight"))
    hidden = int(need("embedding_length"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", 0) or hidden // n_heads)
    rotary = int(field(reader, f"{arch}.rope.dimension_count", 0) or head_dim)
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    try:
        experts = expert_fields(lambda key: field(reader, f"{arch}.{key}"), arch, tensors)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    intermediate = experts.pop("intermediate_size", None) or int(need("feed_forward_length"))
    try:
        cfg = ModelConfig(
            vocab_size=_vocab_size(reader, tensors, path),
            hidden_size=hidden,
            intermediate_size=intermediate,
            n_layers=int(need("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(field(reader, f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=int(field(reader, f"{arch}.attention.key_length", 0)),
            rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            o_proj_bias="blk.0.attn_output.bias" in tensors,
            bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            name=str(field(reader, "general.name", path.stem)),
            rotary_dim=rotary if rotary != head_dim else 0,  # (Phi-3's partial rotary)
            **{**_family_fields(reader, arch, n_heads, path), **experts},
        )
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    return cfg


def _family_fields(reader: Any, arch: str, n_heads: int, path: Path) -> dict[str, Any]:
    """What a family adds to the Llama shape, from its GGUF metadata and what llama.cpp fixes for it: Gemma's
    windows (every other layer for Gemma 2, five of six for Gemma 3, whose local θ is 10 000), soft-caps,
    GeGLU, √d embeddings and attention scale (hidden/heads for the 27B models, else head_dim); GPT-OSS's
    window on every other layer (sliding first)."""
    family = FAMILIES.get(arch, arch)
    out: dict[str, Any] = {"family": family, **FAMILY_TRAITS.get(family, {})}
    if family == "granite":  # its multipliers, as llama.cpp's converter writes them
        for key, name in (("attn_scale", "attention.scale"), ("embed_scale", "embedding_scale"),
                          ("residual_scale", "residual_scale"), ("logits_scale", "logit_scale")):
            if field(reader, f"{arch}.{name}") is not None:
                out[key] = float(field(reader, f"{arch}.{name}"))
    if family == "smollm3":  # llama.cpp fixes its NoPE layers: every 4th (its n_no_rope_layer_step)
        layers = int(field(reader, f"{arch}.block_count"))
        out["nope_layers"] = tuple(i for i in range(layers) if (i + 1) % 4 == 0)
    if family == "phi3" and field(reader, f"{arch}.attention.sliding_window"):  # (0: none)
        out["sliding_window"] = int(field(reader, f"{arch}.attention.sliding_window"))
    if family == "gpt_oss":
        if not field(reader, f"{arch}.attention.sliding_window"):  # llama.cpp requires it too
            raise LoadError(f"{path}: GGUF metadata lacks {arch}.attention.sliding_window (GPT-OSS's window)")
        out.update(_windows(reader, arch))
    if family not in ("gemma2", "gemma3_text"):
        return out
    hidden, layers = int(field(reader, f"{arch}.embedding_length")), int(field(reader, f"{arch}.block_count"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", 0) or hidden // n_heads)
    scalar = hidden // n_heads if _SCALE_BY_HIDDEN.get(layers) == family else head_dim
    scale = field(reader, f"{arch}.attention.scale")  # explicit, when the file has it
    out.update(hidden_act="gelu_pytorch_tanh", embed_scale=hidden ** 0.5,
               attn_scale=float(scale) if scale else scalar ** -0.5)
    out.update(_windows(reader, arch))
    if family == "gemma3_text":
        out.update(rope_local_theta=10000.0, rope_local_scaling=RopeScaling())
    for key, name in (("attn_softcap", "attn_logit_softcapping"), ("final_softcap", "final_logit_softcapping")):
        if field(reader, f"{arch}.{name}"):
            out[key] = float(field(reader, f"{arch}.{name}"))
    return out


def _windows(reader: Any, arch: str) -> dict[str, Any]:
    """The sliding window and which layers have it: the file's sliding_window_pattern (a per-layer list, True
    for a sliding layer, or n: every n-th layer global), else llama.cpp's fixed pattern for the architecture."""
    window = field(reader, f"{arch}.attention.sliding_window")
    if not window:
        return {}
    layers = int(field(reader, f"{arch}.block_count"))
    pattern = field(reader, f"{arch}.attention.sliding_window_pattern", _SWA_PATTERN[arch])
    if isinstance(pattern, list):
        sliding = [bool(x) for x in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    return {"sliding_window": int(window), "layer_types": tuple("sliding" if x else "full" for x in sliding)}


def _rope_scaling(reader: Any, arch: str, context: int) -> RopeScaling:
    """RoPE scaling from GGUF metadata: none, linear, or YaRN (its keys as llama.cpp's converter writes
    them from a Hugging Face rope_scaling; `yarn_attn_factor` is that config's attention_factor).
    Anything else is refused, never ignored."""

    def key(name: str) -> Any:
        return field(reader, f"{arch}.rope.{name}")

    factor = key("scaling.factor") if key("scaling.factor") is not None else key("scale_linear")
    kind = key("scaling.type") or ("linear" if factor not in (None, 1.0) else "none")
    if key("scaling.attn_factor") not in (None, 1.0):
        raise ConfigError(f"GGUF {arch}.rope.scaling.attn_factor is not supported")
    if kind == "none":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", factor=float(factor if factor is not None else 1.0))
    if kind != "yarn":
        raise ConfigError(f"unsupported GGUF RoPE scaling type {kind!r} ({arch}.rope.scaling.type); "
                          "supported: none, linear, yarn")
    if key("scaling.yarn_ext_factor") not in (None, 1.0) or key("scaling.yarn_log_multiplier"):
        raise ConfigError("YaRN with an extrapolation factor or a log multiplier (yarn_ext_factor, "
                          "yarn_log_multiplier) is not supported")
    return RopeScaling(
        "yarn",
        factor=float(factor if factor is not None else 1.0),
        original_max_position_embeddings=int(key("scaling.original_context_length") or context),
        beta_fast=float(key("scaling.yarn_beta_fast") or 32.0),
        beta_slow=float(key("scaling.yarn_beta_slow") or 1.0),
        attention_factor=None if key("scaling.yarn_attn_factor") is None else float(key("scaling.yarn_attn_factor")),
    )


def _vocab_size(reader: Any, tensors: dict[str, Any], path: Path) -> int:
    arch = field(reader, "general.architecture")
    if field(reader, f"{arch}.vocab_size"):
        return int(field(reader, f"{arch}.vocab_size"))
    if "token_embd.weight" in tensors:
        return int(tensors["token_embd.weight"].shape[1])  # GGUF shapes list the fastest dimension first
    raise LoadError(f"{path}: no vocabulary size and no token_embd.weight tensor")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (pairs interleaved → rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader: Any, cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """All weights, dequantized to float32, under their Hugging Face names; a tensor with no role in
    the model is an error naming it."""
    arch = field(reader, "general.architecture")
    permuted = arch in PERMUTED
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}  # layer → its router and stacked experts, by short name
    known = set(_GLOBAL_NAMES).union(*(expected_shapes(cfg, i) for i in range(cfg.n_layers)))
    for t in reader.tensors:
        if cfg.n_experts and t.name.startswith("blk.") and is_expert_tensor(t.name.split(".", 2)[2]):
            _, layer, short = t.name.split(".", 2)
            experts.setdefault(layer, {})[short] = as_float32(t.data, t.tensor_type, t.name)
            continue
        hf_name = hf_tensor_name(t.name, cfg.norm_placement, fused=cfg.family == "phi3", arch=arch)
        if hf_name not in known:
            if t.name in _ROPE_TENSORS or ".attn_rot_embd" in t.name:  # read by read_config; unused
                continue  # by llama.cpp too
            raise LoadError(f"{path}: GGUF tensor {t.name!r} has no role in the model magicdec runs; "
                            "magicdec drops no weights silently")
        assert hf_name is not None
        w = as_float32(t.data, t.tensor_type, t.name)
        if permuted and ".q_proj." in hf_name:
            w = _unpermute(w, cfg.n_heads)
        elif permuted and ".k_proj." in hf_name:
            w = _unpermute(w, cfg.n_kv_heads)
        if cfg.family in PLUS_ONE_NORMS and hf_name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norms with the one added; Hugging Face's w without
        if hf_name.endswith("shared_expert_gate.weight"):
            w = w.reshape(1, -1)  # llama.cpp's [d], transformers' [1, d]
        out[hf_name] = w
    for layer, parts in experts.items():
        try:
            out.update(expert_tensors(parts, layer, cfg))
        except LoadError as e:
            raise LoadError(f"{path}: {e}") from None
    return out


def hf_tensor_name(name: str, norm_placement: str = "pre", fused: bool = False, arch: str = "") -> str | None:
    """The Hugging Face name of a GGUF tensor (None for a tensor with no such name, e.g. rope_freqs);
    `fused`: the family keeps q/k/v and gate/up fused (Phi-3); `arch`: the GGUF architecture, for the names
    that only it has."""
    for hf, gg in _GLOBAL_NAMES.items():
        if name == gg:
            return hf
    parts = name.split(".", 2)
    if parts[0] != "blk":
        return None
    names = {**_LAYER_NAMES, **_NORM_NAMES[norm_placement], **(_FUSED_NAMES if fused else {}),
             **_ARCH_NAMES.get(arch, {})}
    inverse = {v: k for k, v in names.items()}
    return f"model.layers.{parts[1]}.{inverse[parts[2]]}" if parts[2] in inverse else None


def convert_gguf(path: Path, dest: Path) -> None:
    """Write a GGUF file's config.json and float32 weights (model.safetensors) into the folder `dest`."""
    from safetensors.torch import save_file

    reader = open_gguf(path)
    cfg = read_config(reader, path)
    save_file(gguf_tensors(reader, cfg, path), str(dest / "model.safetensors"),
              metadata={"format": "pt", "source": str(path)})
    (dest / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))


def load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device | str, cache_dir: Path, cache_limit_bytes: int,
    tp: TensorParallel | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Load a GGUF model. Files whose dequantized weights fit in `cache_limit_bytes` are converted
    once (by one process, however many ask) into `cache_dir`, a Hugging Face-style directory, and
    read from there; larger ones are dequantized at every load."""
    from magicdec.loading.hf import load_hf

    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise LoadError(f"{path} is not a readable GGUF file: it does not begin with the GGUF magic")
    small = path.stat().st_size * 8 <= cache_limit_bytes  # quantized ≥ 4 bits: float32 ≤ 8× the file
    if not small and damage(cache_dir, "weights") is not None:
        reader = open_gguf(path)
        cfg = read_config(reader, path)
        tensors = gguf_tensors(reader, cfg, path)
        return build_model(cfg, tensors.get, dtype, device, source=str(path), tp=tp, names=tensors), cfg
    convert_once(cache_dir, "weights", lambda dest: convert_gguf(path, dest), f"{path.name} to safetensors")
    try:
        return load_hf(cache_dir, dtype, device, tp)
    except LoadError as e:
        raise LoadError(f"{e} [the conversion of {path.name}: delete {cache_dir} to convert it again]") from None
