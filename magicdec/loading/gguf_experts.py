"""Mixtures of experts in GGUF files, as llama.cpp's converter writes them: their metadata → `ModelConfig` fields,
their router and stacked expert tensors → the family's Hugging Face names.

llama.cpp stacks a layer's experts into one tensor per projection, `ffn_{gate,up,down}_exps` [E, out, in] (GGUF
lists the dimensions the other way round), beside the router `ffn_gate_inp` [E, d]. Mixtral ("llama" with
`expert_count`), Qwen3-MoE, OLMoE and Qwen2-MoE become one tensor per expert (`mlp.experts.{e}.gate_proj`, ...);
Qwen2-MoE adds its shared expert (`ffn_{gate,up,down}_shexp`) and the shared expert's gate `ffn_gate_inp_shexp`
[d]. GPT-OSS ("gpt-oss") has biases on the router and on every expert projection (`ffn_*_exps.bias`), which go
back into transformers' fused layout: `gate_up_proj` [E, d, 2f] with gate and up interleaved (gate = [..., ::2]),
`down_proj` [E, f, d]. A converter run with `--fuse-gate-up-exps` writes `ffn_gate_up_exps` [E, 2f, d] (gate rows,
then up rows) instead of the two; both are read. llama.cpp publishes GPT-OSS's experts as MXFP4 (GGML type 39):
the `gguf` package dequantizes them, so every GGUF type it reads is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from magicdec.config import ModelConfig
from magicdec.loading.assemble import DEFAULT_EXPERT_NAMES, EXPERT_NAMES
from magicdec.loading.errors import LoadError

# a stacked projection → its index in EXPERT_NAMES' (router, expert, gate, up, down)
EXPERT_TENSORS = {"ffn_gate_exps": 2, "ffn_up_exps": 3, "ffn_down_exps": 4}
FUSED_EXPERTS = "ffn_gate_up_exps"
ROUTER = "ffn_gate_inp"
# llama.cpp's top-k renormalisation per architecture (its `expert_weights_norm` key when the file has one)
NORM_TOPK = {"llama": True, "qwen3moe": True, "olmoe": False, "qwen2moe": False, "gpt-oss": False}
SIGMOID_GATING = 2  # llama.cpp's expert_gating_func for σ(scores) (1: softmax; GPT-OSS: softmax of the top k)
# GPT-OSS's clamped SwiGLU, constants in llama.cpp (its swiglu_oai) as in transformers' config
GPT_OSS_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
# Qwen2-MoE's shared expert: our name (under the layer) → llama.cpp's
SHARED_EXPERT_NAMES = {
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}


def is_expert_tensor(short: str) -> bool:
    """Whether a layer's tensor (its name after `blk.N.`) is a router or stacked-experts tensor."""
    base, _, kind = short.rpartition(".")
    return kind in ("weight", "bias") and (base in EXPERT_TENSORS or base in (FUSED_EXPERTS, ROUTER))


def expert_fields(meta: Callable[[str], Any], arch: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """A mixture of experts' fields from GGUF metadata (`meta(key)`: the value of `{arch}.{key}`, or None) and the
    file's tensors: every layer sparse, as llama.cpp runs these architectures; Qwen2-MoE's shared expert and its
    gate; GPT-OSS's SwiGLU constants."""
    n = int(meta("expert_count") or 0)
    if not n:
        return {}
    if meta("expert_used_count") is None:
        raise LoadError(f"GGUF metadata lacks {arch}.expert_used_count (the experts each token uses)")
    if meta("expert_gating_func") == SIGMOID_GATING:
        raise LoadError(f"{arch}.expert_gating_func is sigmoid; magicdec's routers take a softmax of the scores")
    norm = meta("expert_weights_norm")
    out: dict[str, Any] = {"n_experts": n, "n_experts_per_token": int(meta("expert_used_count")),
                           "norm_topk_prob": bool(NORM_TOPK[arch] if norm is None else norm)}
    if arch == "llama":
        out["family"] = "mixtral"
    if arch == "gpt-oss":  # its experts' size is the model's intermediate_size (as in transformers' config)
        size = meta("expert_feed_forward_length") or meta("feed_forward_length")
        if not size:
            raise LoadError(f"GGUF metadata lacks {arch}.expert_feed_forward_length (the experts' hidden size)")
        return {**out, **GPT_OSS_SWIGLU, "intermediate_size": int(size)}
    if meta("expert_feed_forward_length"):
        out["moe_intermediate_size"] = int(meta("expert_feed_forward_length"))
    elif arch == "qwen2moe" and "blk.0.ffn_up_exps.weight" in tensors:  # [d, f, E] in GGUF's order
        out["moe_intermediate_size"] = int(tensors["blk.0.ffn_up_exps.weight"].shape[1])
    if "blk.0.ffn_up_shexp.weight" in tensors:  # Qwen2-MoE: [d, s] in GGUF's order
        shared = meta("expert_shared_feed_forward_length") or tensors["blk.0.ffn_up_shexp.weight"].shape[1]
        out.update(shared_expert_intermediate_size=int(shared),
                   shared_expert_gate="blk.0.ffn_gate_inp_shexp.weight" in tensors)
    return out


def expert_tensors(parts: dict[str, torch.Tensor], layer: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer's router and stacked-experts tensors (float32, by their names after `blk.N.`) under the family's
    Hugging Face names."""
    p = f"model.layers.{layer}."
    if cfg.family == "gpt_oss":
        return {p + k: v for k, v in _gpt_oss_experts(parts, layer, cfg).items()}
    if any(name.endswith(".bias") for name in parts):
        raise LoadError(f"GGUF layer {layer}: biases on the router or experts ({', '.join(sorted(parts))}) are not "
                        f"part of {cfg.family}; magicdec drops no weights silently")
    router, expert, *roles = EXPERT_NAMES.get(cfg.family, DEFAULT_EXPERT_NAMES)
    stacked = _split_fused(parts, "weight", layer)
    out = {p + router + ".weight": _need(parts, ROUTER + ".weight", layer)}
    for short, role in EXPERT_TENSORS.items():
        w = _need(stacked, short + ".weight", layer)
        out.update({p + expert.format(e) + roles[role - 2] + ".weight": w[e].contiguous() for e in range(len(w))})
    return out


def _gpt_oss_experts(parts: dict[str, torch.Tensor], layer: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-OSS's router and experts in transformers' layout: gate and up interleaved in `gate_up_proj` [E, d, 2f]
    (and its bias [E, 2f]), `down_proj` [E, f, d] (bias [E, d]), the router's weight and bias."""
    out = {"mlp.router.weight": _need(parts, ROUTER + ".weight", layer),
           "mlp.router.bias": _need(parts, ROUTER + ".bias", layer)}
    for kind, suffix in (("weight", ""), ("bias", "_bias")):
        stacked = _split_fused(parts, kind, layer)
        gate, up = (_need(stacked, f"ffn_{x}_exps.{kind}", layer) for x in ("gate", "up"))
        down = _need(stacked, f"ffn_down_exps.{kind}", layer)
        if gate.shape != up.shape:
            raise LoadError(f"GGUF layer {layer}: ffn_gate_exps.{kind} {list(gate.shape)} and ffn_up_exps.{kind} "
                            f"{list(up.shape)} differ in shape")
        if kind == "weight":  # [E, f, d] → [E, d, f]
            gate, up, down = gate.transpose(1, 2), up.transpose(1, 2), down.transpose(1, 2)
        gate_up = torch.stack([gate, up], dim=-1).flatten(-2)  # [..., f, 2] → [..., 2f]: gate at even columns
        out[f"mlp.experts.gate_up_proj{suffix}"] = gate_up.contiguous()
        out[f"mlp.experts.down_proj{suffix}"] = down.contiguous()
    return out


def _split_fused(parts: dict[str, torch.Tensor], kind: str, layer: str) -> dict[str, torch.Tensor]:
    """`parts` with a fused `ffn_gate_up_exps.{kind}` [E, 2f, ...] split into its gate and up halves."""
    fused = parts.get(f"{FUSED_EXPERTS}.{kind}")
    if fused is None:
        return parts
    if any(f"ffn_{x}_exps.{kind}" in parts for x in ("gate", "up")):
        raise LoadError(f"GGUF layer {layer} holds both {FUSED_EXPERTS}.{kind} and separate gate/up experts")
    gate, up = fused.chunk(2, dim=1)
    return {**parts, f"ffn_gate_exps.{kind}": gate, f"ffn_up_exps.{kind}": up}


def _need(parts: dict[str, torch.Tensor], name: str, layer: str) -> torch.Tensor:
    if name not in parts:
        raise LoadError(f"GGUF tensor blk.{layer}.{name} is missing (the layer has {', '.join(sorted(parts))})")
    return parts[name]


def as_float32(data: Any, tensor_type: Any, name: str) -> torch.Tensor:
    """A GGUF tensor's values as float32 (dequantized by the `gguf` package); a type it cannot read is an error
    naming the tensor and its type."""
    from importlib.metadata import version

    import gguf

    try:
        values = gguf.quants.dequantize(data, tensor_type)
    except NotImplementedError:
        kind = getattr(tensor_type, "name", tensor_type)
        raise LoadError(f"GGUF tensor {name!r} is stored as {kind}, which the installed gguf package "
                        f"({version('gguf')}) cannot dequantize; upgrade gguf, or convert the file to a type it "
                        "reads (llama-quantize to Q8_0, or F16)") from None
    return torch.from_numpy(np.array(values, dtype=np.float32))
