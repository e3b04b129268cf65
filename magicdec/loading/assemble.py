"""Turns tensors named as in a Hugging Face Llama checkpoint into our module's state dict.

Both loaders (safetensors, GGUF) only provide `get(hf_name) -> Tensor` in Hugging Face layout;
this file checks every shape against the config, fuses q/k/v and gate/up, casts, and builds the
model without ever initialising random weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from magicdec.config import ModelConfig
from magicdec.loading.errors import LoadError
from magicdec.model.llama import Transformer
from magicdec.parallel.tp import TensorParallel, hf_slice, ranges, shard_model

TensorGetter = Callable[..., "torch.Tensor | None"]  # get(hf_name) or get(hf_name, (dim, start, end))


def expected_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of `layer` as the family names it in a Hugging Face checkpoint, with its shape."""
    d, f, p = cfg.hidden_size, cfg.intermediate_size, f"model.layers.{layer}."
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.family == "phi3":  # fused in the checkpoint: split at load
        shapes[p + "self_attn.qkv_proj.weight"] = (cfg.q_size + 2 * cfg.kv_size, d)
    else:
        shapes.update({p + "self_attn.q_proj.weight": (cfg.q_size, d), p + "self_attn.k_proj.weight": (cfg.kv_size, d),
                       p + "self_attn.v_proj.weight": (cfg.kv_size, d)})
    shapes[p + "self_attn.o_proj.weight"] = (d, cfg.q_size)
    for hf_name in NORM_NAMES[cfg.norm_placement].values():
        shapes[p + hf_name] = (d,)
    if cfg.is_moe_layer(layer):
        shapes.update(moe_shapes(cfg, layer))
    elif cfg.family == "phi3":
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * f, d)
    else:
        shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d)})
    if not cfg.is_moe_layer(layer):
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    if cfg.attn_sinks:
        shapes[p + "self_attn.sinks"] = (cfg.n_heads,)
    if cfg.qk_norm:
        full = cfg.qk_norm == "full"
        shapes[p + "self_attn.q_norm.weight"] = (cfg.q_size if full else cfg.head_dim,)
        shapes[p + "self_attn.k_norm.weight"] = (cfg.kv_size if full else cfg.head_dim,)
    if cfg.attention_bias:
        shapes.update({
            p + "self_attn.q_proj.bias": (cfg.q_size,),
            p + "self_attn.k_proj.bias": (cfg.kv_size,),
            p + "self_attn.v_proj.bias": (cfg.kv_size,),
        })
    if cfg.o_proj_bias:
        shapes[p + "self_attn.o_proj.bias"] = (d,)
    return shapes


# each MoE family's names of the router and of one expert's gate, up and down projections (under the layer)
EXPERT_NAMES = {"mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{}.", "w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("mlp.gate", "mlp.experts.{}.", "gate_proj", "up_proj", "down_proj")


def moe_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """The tensors of a MoE layer's feed-forward: router, experts (one tensor per expert and projection; GPT-OSS:
    all experts in one tensor per projection, gate and up interleaved), the shared expert and its gate."""
    d, f, e, p = cfg.hidden_size, cfg.expert_size, cfg.n_experts, f"model.layers.{layer}."
    if cfg.family == "gpt_oss":
        return {p + "mlp.router.weight": (e, d), p + "mlp.router.bias": (e,),
                p + "mlp.experts.gate_up_proj": (e, d, 2 * f), p + "mlp.experts.gate_up_proj_bias": (e, 2 * f),
                p + "mlp.experts.down_proj": (e, f, d), p + "mlp.experts.down_proj_bias": (e, d)}
    router, expert, gate, up, down = EXPERT_NAMES.get(cfg.family, DEFAULT_EXPERT_NAMES)
    shapes = {p + router + ".weight": (e, d)}
    for i in range(e):
        x = p + expert.format(i)
        shapes.update({x + gate + ".weight": (f, d), x + up + ".weight": (f, d), x + down + ".weight": (d, f)})
    if cfg.shared_expert_intermediate_size:
        s = cfg.shared_expert_intermediate_size
        shapes.update({p + "mlp.shared_expert.gate_proj.weight": (s, d), p + "mlp.shared_expert.up_proj.weight": (s, d),
                       p + "mlp.shared_expert.down_proj.weight": (d, s)})
        if cfg.shared_expert_gate:
            shapes[p + "mlp.shared_expert_gate.weight"] = (1, d)
    return shapes


def moe_state(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MoE module's tensors (under `mlp.`) from a layer's checkpoint tensors `t` (named under the layer)."""
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt_oss":  # [E, d, 2f] with gate = [..., ::2], up = [..., 1::2]; down [E, f, d]
        out["router.weight"], out["router.bias"] = t["mlp.router.weight"], t["mlp.router.bias"]
        gu, gub = t["mlp.experts.gate_up_proj"], t["mlp.experts.gate_up_proj_bias"]
        for i in range(cfg.n_experts):
            x = f"experts.{i}."
            out[x + "w_gate_up.weight"] = torch.cat([gu[i, :, ::2].T, gu[i, :, 1::2].T]).contiguous()
            out[x + "w_gate_up.bias"] = torch.cat([gub[i, ::2], gub[i, 1::2]])
            out[x + "w_down.weight"] = t["mlp.experts.down_proj"][i].T.contiguous()
            out[x + "w_down.bias"] = t["mlp.experts.down_proj_bias"][i]
        return out
    router, expert, gate, up, down = EXPERT_NAMES.get(cfg.family, DEFAULT_EXPERT_NAMES)
    out["router.weight"] = t[router + ".weight"]
    for i in range(cfg.n_experts):
        x = expert.format(i)
        out[f"experts.{i}.w_gate_up.weight"] = torch.cat([t[x + gate + ".weight"], t[x + up + ".weight"]])
        out[f"experts.{i}.w_down.weight"] = t[x + down + ".weight"]
    if cfg.shared_expert_intermediate_size:
        out["shared.w_gate_up.weight"] = torch.cat([t["mlp.shared_expert.gate_proj.weight"],
                                                    t["mlp.shared_expert.up_proj.weight"]])
        out["shared.w_down.weight"] = t["mlp.shared_expert.down_proj.weight"]
        if cfg.shared_expert_gate:
            out["shared_gate.weight"] = t["mlp.shared_expert_gate.weight"]
    return out


# our norm → the checkpoint's, by where the model puts its norms
NORM_NAMES = {
    "pre": {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"},
    "sandwich": {"attn_norm": "input_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight",
                 "mlp_norm": "pre_feedforward_layernorm.weight",
                 "post_mlp_norm": "post_feedforward_layernorm.weight"},
    "post": {"post_attn_norm": "post_attention_layernorm.weight",
             "post_mlp_norm": "post_feedforward_layernorm.weight"},
}
# families whose RMSNorm multiplies by (1 + w): the checkpoint's w plus one is our weight
PLUS_ONE_NORMS = ("gemma2", "gemma3_text")


# Checkpoint tensors that transformers itself ignores when loading (old per-layer RoPE buffers).
IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def check_all_used(cfg: ModelConfig, names: Iterable[str], used: set[str], source: str) -> None:
    """Refuse a checkpoint holding tensors the model would not use (never drop weights silently);
    tensors transformers ignores too are allowed, and so is the head of a tied model (tied to the embedding)."""
    unused = sorted(n for n in names if n not in used and not IGNORED.search(n)
                    and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise LoadError(
            f"{source}: the model its config describes does not use tensor {', '.join(map(repr, unused[:3]))}"
            f"{more}; magicdec drops no weights silently (does the config match the weights?)"
        )


def build_model(
    cfg: ModelConfig,
    get: TensorGetter,
    dtype: torch.dtype,
    device: torch.device | str,
    source: str,
    tp: TensorParallel | None = None,
    sliced: bool = False,
    names: Iterable[str] = (),
) -> Transformer:
    """The model of `cfg` with the weights `get` returns. With `tp`, this rank's shard: when the getter
    reads slices (`sliced`, `get(name, (dim, start, end))`), only the shard is ever read; otherwise the
    whole model is built and then cut. `names`: every tensor the checkpoint holds; one the model does
    not use is an error."""
    used: set[str] = set()
    if cfg.family == "phi3":  # fused q/k/v and gate/up: read whole, cut after the split
        sliced = False

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        used.add(name)
        part = hf_slice(cfg, tp, name) if tp is not None and sliced else None
        if part is not None and part[0] >= len(shape):  # o_proj's bias: whole on every rank
            part = None
        t = get(name, part) if part is not None else get(name)
        if part is not None:
            dim, a, b = part
            shape = shape[:dim] + (b - a,) + shape[dim + 1 :]
        if t is None:
            raise LoadError(f"{source}: tensor {name!r} is missing")
        if tuple(t.shape) != shape:
            raise LoadError(
                f"{source}: tensor {name!r} has shape {list(t.shape)}, but the config implies {list(shape)}; "
                "the weights do not match config.json"
            )
        return t.to(device=device, dtype=dtype)

    d, v = cfg.hidden_size, cfg.vocab_size
    plus = 1.0 if cfg.family in PLUS_ONE_NORMS else 0.0
    state: dict[str, torch.Tensor] = {
        "embed.weight": take("model.embed_tokens.weight", (v, d)),
        "norm.weight": take("model.norm.weight", (d,)) + plus,
    }
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = take("lm_head.weight", (v, d))
    for i in range(cfg.n_layers):
        s, p, o = expected_shapes(cfg, i), f"model.layers.{i}.", f"layers.{i}."
        t = {name[len(p):]: take(name, shape) for name, shape in s.items()}
        for ours, theirs in NORM_NAMES[cfg.norm_placement].items():
            state[o + ours + ".weight"] = t[theirs] + plus
        if cfg.qk_norm:
            state[o + "attn.q_norm.weight"] = t["self_attn.q_norm.weight"] + plus
            state[o + "attn.k_norm.weight"] = t["self_attn.k_norm.weight"] + plus
        if cfg.family == "phi3":
            state[o + "attn.wqkv.weight"] = t["self_attn.qkv_proj.weight"]
            state[o + "mlp.w_gate_up.weight"] = t["mlp.gate_up_proj.weight"]
        else:
            state[o + "attn.wqkv.weight"] = torch.cat([t[f"self_attn.{x}_proj.weight"] for x in "qkv"])
        if cfg.is_moe_layer(i):
            state.update({o + "mlp." + k: w for k, w in moe_state(cfg, t).items()})
        elif cfg.family != "phi3":
            state[o + "mlp.w_gate_up.weight"] = torch.cat([t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"]])
        if cfg.attn_sinks:
            state[o + "attn.sinks"] = t["self_attn.sinks"]
        if cfg.attention_bias:
            state[o + "attn.wqkv.bias"] = torch.cat([t[f"self_attn.{x}_proj.bias"] for x in "qkv"])
        state[o + "attn.wo.weight"] = t["self_attn.o_proj.weight"]
        if cfg.o_proj_bias:
            state[o + "attn.wo_bias"] = t["self_attn.o_proj.bias"]
        if not cfg.is_moe_layer(i):
            state[o + "mlp.w_down.weight"] = t["mlp.down_proj.weight"]

    check_all_used(cfg, names, used, source)
    model = Transformer(cfg, device="meta")
    if tp is not None and sliced:
        shard_model(model, tp)  # a meta model: only the shapes change, to this rank's shard
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["embed.weight"][slice(*ranges(cfg, tp).vocab)]
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings and not (tp is not None and sliced):
        model.lm_head.weight = model.embed.weight  # a whole model under TP: shard_model cuts the head from it
    model.rope = model.rope.to(device)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LoadError(f"{source}: no weights for {', '.join(missing[:5])}")
    if tp is not None and not sliced:
        shard_model(model, tp)
    return model.eval().requires_grad_(False)
