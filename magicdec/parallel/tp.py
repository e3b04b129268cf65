"""Tensor parallelism over torch.distributed (NCCL on CUDA, gloo on CPU), applied to a model after
it is built: the model code knows nothing about it.

`shard_model` cuts a model in place for one rank:
- attention by KV heads, query heads following (the fused q/k/v projection keeps this rank's query,
  key and value rows; the output projection its columns; GPT-OSS's sinks its heads' logits), so each
  rank's KV cache holds its heads;
- the MLP by columns, then rows (gate/up rows, down-projection columns);
- a mixture of experts likewise, expert by expert (each expert's gate/up rows and down-projection columns,
  the shared expert's too); the router and the shared expert's gate are replicated, so every rank routes
  every token alike; a down-projection bias (GPT-OSS) stays on rank 0 only, so the sum adds it once;
- the LM head by vocabulary rows; the embedding stays whole (a lookup, not a matmul);
and installs the communication as forward hooks: an all-reduce after the attention output and the
MLP down projections (after the whole MoE module: one per MoE layer, of its experts' summed partial
outputs, shared expert included), an all-gather of the logits, so every rank sees the whole distribution and
samples, with the same seed, the same tokens.

A meta model can be sharded before its weights are loaded: `hf_slice` tells a loader which part of
each checkpoint tensor this rank needs, so a rank reads only its shard from safetensors.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from magicdec.config import ModelConfig
from magicdec.model.linear import Linear
from magicdec.model.moe import MoE
from magicdec.parallel.watchdog import start_watchdog


@dataclass(frozen=True, slots=True)
class TensorParallel:
    rank: int
    world: int
    group: Any = None  # the process group (None: the default one)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")


def init_from_env(device_type: str) -> TensorParallel | None:
    """Join the process group torchrun describes in the environment (None when run alone), and start the
    watchdog that ends this rank when another one fails (`magicdec.parallel.watchdog`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    start_watchdog()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def _split_parts(cfg: ModelConfig) -> dict[str, int]:
    """What tensor parallelism splits, by name: each must divide by the world size."""
    parts = {"KV heads": cfg.n_kv_heads}
    if not cfg.n_experts or any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        parts["MLP columns"] = cfg.intermediate_size
    if cfg.n_experts:
        parts["expert columns"] = cfg.expert_size
    if cfg.shared_expert_intermediate_size:
        parts["shared expert columns"] = cfg.shared_expert_intermediate_size
    parts["vocabulary rows"] = cfg.vocab_size
    return parts


def check_shardable(cfg: ModelConfig, world: int) -> None:
    """Refuse, with the reason and the fix, a world size that does not divide the model."""
    parts = _split_parts(cfg)
    bad = [f"{n} {name}" for name, n in parts.items() if n % world]
    if bad:
        ok = [w for w in range(1, cfg.n_kv_heads + 1) if all(n % w == 0 for n in parts.values())]
        how = "attention is split by KV heads" + (", each expert by its columns" if cfg.n_experts else "")
        raise ValueError(
            f"tensor parallelism: {cfg.name or 'this model'} cannot be split {world} ways: {', '.join(bad)} "
            f"are not divisible by {world} ({how}). Use a world size of {', '.join(map(str, ok))}."
        )


@dataclass(frozen=True, slots=True)
class Ranges:
    """This rank's rows/columns: query features, key/value features, MLP columns, vocabulary rows, a routed
    expert's columns, the shared expert's columns ((0, 0) where the model has none)."""

    q: tuple[int, int]
    kv: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    expert: tuple[int, int] = (0, 0)
    shared: tuple[int, int] = (0, 0)


def ranges(cfg: ModelConfig, tp: TensorParallel) -> Ranges:
    check_shardable(cfg, tp.world)
    r, w, d = tp.rank, tp.world, cfg.head_dim

    def part(total: int) -> tuple[int, int]:
        n = total // w
        return r * n, (r + 1) * n

    q = part(cfg.n_heads)
    kv = part(cfg.n_kv_heads)
    return Ranges((q[0] * d, q[1] * d), (kv[0] * d, kv[1] * d), part(cfg.intermediate_size), part(cfg.vocab_size),
                  part(cfg.expert_size) if cfg.n_experts else (0, 0), part(cfg.shared_expert_intermediate_size))


# a routed or shared expert's projection in a checkpoint: Qwen-MoE/OLMoE `experts.{e}.gate_proj`, Mixtral
# `experts.{e}.w1` (gate), `w3` (up), `w2` (down), Qwen2-MoE `shared_expert.gate_proj`
_EXPERT_PROJ = re.compile(r"\.(experts\.\d+|shared_expert)\.(gate_proj|up_proj|w1|w3|down_proj|w2)\.")
# GPT-OSS: all experts in one tensor per projection, gate and up interleaved in the last dimension (column j's
# gate at 2j, its up at 2j + 1), so a rank's columns a..b are the contiguous 2a..2b
_STACKED_EXPERTS = {"mlp.experts.gate_up_proj": (2, 2), "mlp.experts.gate_up_proj_bias": (1, 2),
                    "mlp.experts.down_proj": (1, 1)}


def hf_slice(cfg: ModelConfig, tp: TensorParallel, hf_name: str) -> tuple[int, int, int] | None:
    """(dim, start, end) of the part of a Hugging Face checkpoint tensor this rank needs (None: all)."""
    rg = ranges(cfg, tp)
    if hf_name == "lm_head.weight":
        return 0, *rg.vocab
    table = {
        "self_attn.q_proj": (0, rg.q), "self_attn.k_proj": (0, rg.kv), "self_attn.v_proj": (0, rg.kv),
        "self_attn.o_proj": (1, rg.q), "mlp.gate_proj": (0, rg.ffn), "mlp.up_proj": (0, rg.ffn),
        "mlp.down_proj": (1, rg.ffn),
    }
    if cfg.qk_norm == "full":  # (OLMo 2) one weight per q/k feature: each rank's heads' part
        table.update({"self_attn.q_norm": (0, rg.q), "self_attn.k_norm": (0, rg.kv)})
    for key, (dim, (a, b)) in table.items():
        if f".{key}." in hf_name:
            return dim, a, b
    if hf_name.endswith(".self_attn.sinks"):  # (GPT-OSS) one logit per query head
        return 0, rg.q[0] // cfg.head_dim, rg.q[1] // cfg.head_dim
    if m := _EXPERT_PROJ.search(hf_name):
        a, b = rg.shared if m[1] == "shared_expert" else rg.expert
        return (1 if m[2] in ("down_proj", "w2") else 0), a, b
    for key, (dim, scale) in _STACKED_EXPERTS.items():
        if hf_name.endswith(f".{key}"):
            return dim, scale * rg.expert[0], scale * rg.expert[1]
    return None  # also GPT-OSS's down-projection bias: whole, kept on rank 0 (see shard_model)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=False)


def shard_model(model: nn.Module, tp: TensorParallel, weights_sharded: bool = False) -> None:
    """Cut `model` (a full model, real or meta) to this rank's shard and install the communication.
    With `weights_sharded`, the weights already are the shard (a sharded load): only the head counts,
    the LM head and the hooks change."""
    cfg: ModelConfig = model.config
    rg, w = ranges(cfg, tp), tp.world
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        if not weights_sharded:
            q, k, v = attn.wqkv.weight.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            attn.wqkv.weight = _param(torch.cat([q[slice(*rg.q)], k[slice(*rg.kv)], v[slice(*rg.kv)]]))
            if attn.wqkv.bias is not None:
                qb, kb, vb = attn.wqkv.bias.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
                attn.wqkv.bias = _param(torch.cat([qb[slice(*rg.q)], kb[slice(*rg.kv)], vb[slice(*rg.kv)]]))
            attn.wo.weight = _param(attn.wo.weight[:, slice(*rg.q)])
            if attn.sinks is not None:  # (GPT-OSS) one logit per query head: this rank's heads'
                attn.sinks = _param(attn.sinks[rg.q[0] // cfg.head_dim: rg.q[1] // cfg.head_dim])
        if cfg.qk_norm == "full":  # normalised over every head's features: the sums of squares all-reduced
            attn.q_norm = SplitRMSNorm(attn.q_norm.weight, rg.q, cfg.q_size, attn.q_norm.eps, tp, weights_sharded)
            attn.k_norm = SplitRMSNorm(attn.k_norm.weight, rg.kv, cfg.kv_size, attn.k_norm.eps, tp, weights_sharded)
        attn.n_heads, attn.n_kv_heads = cfg.n_heads // w, cfg.n_kv_heads // w
        for lin in (attn.wqkv, attn.wo):
            lin.out_features, lin.in_features = lin.weight.shape
        attn.wo.register_forward_hook(_all_reduce_hook(tp))
        if isinstance(mlp, MoE):
            for expert in mlp.experts:
                _split_swiglu(expert.w_gate_up, expert.w_down, expert.size, rg.expert, tp, weights_sharded)
                expert.size //= w
            if mlp.shared is not None:
                _split_swiglu(mlp.shared.w_gate_up, mlp.shared.w_down, mlp.shared.size, rg.shared, tp, weights_sharded)
                mlp.shared.size //= w
            mlp.register_forward_hook(_all_reduce_hook(tp))  # once per layer: every expert's partial sums
        else:
            _split_swiglu(mlp.w_gate_up, mlp.w_down, mlp.intermediate, rg.ffn, tp, weights_sharded)
            mlp.intermediate //= w
            mlp.w_down.register_forward_hook(_all_reduce_hook(tp))
    if not weights_sharded or cfg.tie_word_embeddings:  # a tied head is cut from the (whole) embedding
        source = model.embed.weight if cfg.tie_word_embeddings else model.lm_head.weight
        model.lm_head.weight = _param(source[slice(*rg.vocab)])
    model.lm_head.out_features = model.lm_head.weight.shape[0]
    model.lm_head.register_forward_hook(_all_gather_hook(tp))
    model.tp = tp


def _split_swiglu(gate_up: Linear, down: Linear, size: int, part: tuple[int, int], tp: TensorParallel,
                  sharded: bool) -> None:
    """Cut a SwiGLU (fused [gate | up] of `size` columns each, then down) to this rank's columns `part`: the
    gate/up rows (and biases) of those columns, the down projection's columns. The down projection's bias is
    kept on rank 0 only: the all-reduce of the partial outputs adds it once."""
    if not sharded:
        cols = slice(*part)
        gate, up = gate_up.weight.split(size)
        gate_up.weight = _param(torch.cat([gate[cols], up[cols]]))
        if gate_up.bias is not None:
            gate_b, up_b = gate_up.bias.split(size)
            gate_up.bias = _param(torch.cat([gate_b[cols], up_b[cols]]))
        down.weight = _param(down.weight[:, cols])
    if down.bias is not None and tp.rank != 0:
        down.bias = None
    for lin in (gate_up, down):
        lin.out_features, lin.in_features = lin.weight.shape


class SplitRMSNorm(nn.Module):
    """An RMSNorm over features split across the ranks (OLMo 2's q and k norms, over all heads): each rank
    holds its features' weights; the sum of squares is all-reduced, so every rank divides by the whole RMS."""

    def __init__(self, weight: torch.Tensor, part: tuple[int, int], total: int, eps: float, tp: TensorParallel,
                 sharded: bool) -> None:
        super().__init__()
        self.weight = _param(weight if sharded else weight[slice(*part)])
        self.total, self.eps, self.tp = total, eps, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        squares = x32.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(squares, group=self.tp.group)
        return self.weight * (x32 * torch.rsqrt(squares / self.total + self.eps)).to(x.dtype)


def _all_reduce_hook(tp: TensorParallel) -> Any:
    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=tp.group)
        return out

    return hook


def _all_gather_hook(tp: TensorParallel) -> Any:
    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(out) for _ in range(tp.world)]
        dist.all_gather(parts, out.contiguous(), group=tp.group)
        return torch.cat(parts, dim=-1)

    return hook


def comm_device(tp: TensorParallel, device: torch.device) -> torch.device:
    """Where small host values travel between ranks: the device under NCCL, the CPU under gloo."""
    return device if dist.get_backend(tp.group) == "nccl" else torch.device("cpu")


def broadcast_seed(tp: TensorParallel | None, seed: int | None, device: torch.device) -> int | None:
    """A seed every rank shares (rank 0's draw when none was given), so sampling agrees across ranks."""
    if tp is None or seed is not None:
        return seed
    draw = int.from_bytes(os.urandom(4), "little") if tp.rank == 0 else 0
    t = torch.tensor([draw], dtype=torch.long, device=comm_device(tp, device))
    dist.broadcast(t, src=0, group=tp.group)
    return int(t.item())


def agree_min(tp: TensorParallel, value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (e.g. the KV blocks each rank's free memory holds), on every rank."""
    t = torch.tensor([value], dtype=torch.long, device=comm_device(tp, device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
    return int(t.item())


class RankZeroGamma:
    """Every rank must run the same γ each round (their forwards meet in collectives), but each times its
    own steps: rank 0's policy chooses from rank 0's step times and broadcasts its choice. Every rank
    reports its rounds to its own policy, but only rank 0's is consulted (an `AutoGamma` on another rank,
    never asked to choose, keeps nothing of them: its α estimate stays the prior). So is its per-request γ
    trimming threshold (`token_threshold`, which `RequestGamma` asks after each choice)."""

    def __init__(self, policy: Any, tp: TensorParallel, device: torch.device) -> None:
        self.policy, self.tp = policy, tp
        self.device = comm_device(tp, device)

    def choose(self, batch: Any) -> int:
        gamma = self.policy.choose(batch) if self.tp.rank == 0 else 0
        t = torch.tensor([gamma], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0, group=self.tp.group)
        return int(t.item())

    def token_threshold(self, gamma: int) -> float | None:
        """Rank 0's `token_threshold` (the per-request γ trimming of `RequestGamma`), on every rank; None on
        every rank if the policy has none."""
        ask = getattr(self.policy, "token_threshold", None)
        if ask is None:  # the same policy type on every rank: no rank broadcasts
            return None
        value = ask(gamma) if self.tp.rank == 0 else None
        t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0, group=self.tp.group)
        out = float(t.item())
        return None if math.isnan(out) else out

    def observe(self, report: Any) -> None:
        self.policy.observe(report)

    def stats(self) -> dict[str, Any]:
        return self.policy.stats()
