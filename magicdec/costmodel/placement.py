"""Where a draft model runs under tensor parallelism: sharded like the target, or replicated on every rank."""

from __future__ import annotations

from pathlib import Path

import torch

from magicdec.config import ModelConfig
from magicdec.costmodel.device import device_profile
from magicdec.costmodel.steps import CostModel, DraftSpec
from magicdec.loading.hf import read_config
from magicdec.parallel.tp import check_shardable

DRAFT_PLACEMENTS = ("auto", "sharded", "replicated")


def check_placement(mode: str) -> None:
    if mode not in DRAFT_PLACEMENTS:
        raise ValueError(f"draft placement (draft_tp) must be one of {DRAFT_PLACEMENTS}, got {mode!r}")


def shard_draft(mode: str, path: str | Path, target: ModelConfig, world: int, device: torch.device,
                dtype: torch.dtype) -> bool:
    """Whether to shard the draft at `path` over `world` ranks: as `mode` asks ("sharded", "replicated"),
    or ("auto") when the cost model predicts it drafts faster sharded. A draft that cannot be split that
    many ways, or has no config to plan with (a GGUF file), is replicated."""
    check_placement(mode)
    if world == 1 or mode == "replicated":
        return False
    if mode == "sharded":
        return True
    p = Path(path)
    if not p.is_dir():
        return False
    cfg = read_config(p)
    try:
        check_shardable(cfg, world)
    except ValueError:
        return False
    profile = device_profile(device, target, dtype)
    costs = {w: CostModel(target, profile, DraftSpec("draft", None, cfg, tp=w), dtype.itemsize, world)
             for w in (1, world)}
    return costs[world].t_draft(1, 4096) < costs[1].t_draft(1, 4096)
