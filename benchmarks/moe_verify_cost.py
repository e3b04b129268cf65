"""A mixture of experts' verification cost on this machine next to the cost model's prediction (issue 26).

A verification of γ + 1 tokens per sequence reads the experts those tokens route to: on a MoE its time grows
with γ where a dense model's (of the same active size) stays about flat at small batch. This script builds two
random models from transformers' config classes — a Qwen3-MoE shape (64 experts, top-8) and the dense
Qwen3 of the same active MLP size — measures the target forward of γ + 1 tokens per sequence over random KV
(`magicdec.bench.profile`, the forwards `magicdec profile` times), and prints T_V(γ)/T_V(0) measured and as
the cost model predicts it with the built-in CPU profile (uniform routing; random routers route about
uniformly).

    PYTHONPATH=. python benchmarks/moe_verify_cost.py [--batches 1,4] [--context 1024] [--gammas 0,1,2,4,8]
"""

from __future__ import annotations

import argparse

import torch

from magicdec import LLM, SpecConfig
from magicdec.bench.profile import measure_point
from magicdec.config import ModelConfig
from magicdec.costmodel import CostModel, DraftSpec, load_profile
from magicdec.loading.random_init import random_loaded_model

# weights far past the CPU's caches (the MoE 1.7 GB, the dense model 0.4 GB in float32), as a real model's are
SHAPE = dict(vocab_size=4096, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
             head_dim=64, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0)
EXPERTS, TOP_K, EXPERT_SIZE = 64, 8, 256


def models() -> dict[str, ModelConfig]:
    """The two shapes as magicdec reads them from transformers' configs."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    configs = {"Qwen3-MoE (64 experts, top-8)": Qwen3MoeConfig(**SHAPE, num_experts=EXPERTS,
                                                                num_experts_per_tok=TOP_K, intermediate_size=2048,
                                                                moe_intermediate_size=EXPERT_SIZE),
               "dense Qwen3, same active MLP": Qwen3Config(**SHAPE, intermediate_size=TOP_K * EXPERT_SIZE)}
    return {name: ModelConfig.from_hf(config.to_dict(), name) for name, config in configs.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,4")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--gammas", default="0,1,2,4,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", default="cpu", help="the hardware profile predicting (a name or a fitted JSON)")
    args = p.parse_args()
    gammas = [int(g) for g in args.gammas.split(",")]
    profile = load_profile(args.profile)
    print(f"| model | batch × context | γ | T_V(γ) ms | T_V(γ)/T_V(0) measured | predicted ({profile.name} profile) |")
    print("|---|---|---|---|---|---|")
    for seed, (name, cfg) in enumerate(models().items()):
        llm = LLM(loaded=random_loaded_model(cfg, "cpu", torch.float32, seed), device="cpu")
        model = CostModel(cfg, profile, DraftSpec(kind="self", budget=256), dtype_bytes=4)
        for batch in map(int, args.batches.split(",")):
            records = list(measure_point(llm, batch, args.context, gammas, SpecConfig(method="self", budget=256),
                                         repeats=args.repeats, kinds=("verify",)))
            t = {r["gamma"]: r["seconds"] for r in records}
            for g in gammas:
                predicted = model.t_verify(batch, args.context, g) / model.t_verify(batch, args.context, 0)
                print(f"| {name} | {batch} × {args.context} | {g} | {1e3 * t[g]:.1f} | {t[g] / t[0]:.2f} | "
                      f"{predicted:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
