"""The memory plan: bytes of weights and KV caches for a batch, checked before anything is allocated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from magicdec.config import ModelConfig

if TYPE_CHECKING:
    from magicdec.model.llama import Transformer


class OutOfMemoryPlan(MemoryError):
    """The planned weights and caches would not fit; the message gives the bytes and the fix."""


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


@dataclass(slots=True)
class MemoryPlan:
    """Named byte counts: 'weights' (already resident) and each buffer still to allocate."""

    resident: dict[str, int] = field(default_factory=dict)
    to_allocate: dict[str, int] = field(default_factory=dict)
    fix: str = "use a smaller batch, shorter prompts or fewer new tokens"  # what to change, for the message

    @property
    def total(self) -> int:
        return sum(self.resident.values()) + sum(self.to_allocate.values())

    def describe(self) -> str:
        parts = [f"{k} {fmt_bytes(v)}" for k, v in {**self.resident, **self.to_allocate}.items()]
        return ", ".join(parts)

    def check(self, device: torch.device, budget: int | None = None) -> None:
        """Raise OutOfMemoryPlan if what is still to allocate exceeds the memory available
        (or if everything exceeds the user's `budget` in bytes)."""
        need = sum(self.to_allocate.values())
        if budget is not None and self.total > budget:
            raise OutOfMemoryPlan(
                f"the plan needs {fmt_bytes(self.total)} ({self.describe()}), over the memory budget of "
                f"{fmt_bytes(budget)} ({budget} bytes): {self.fix}, or raise the budget (--memory-budget)."
            )
        free = available_bytes(device)
        if need > free:
            raise OutOfMemoryPlan(
                f"the plan needs {fmt_bytes(need)} more ({self.describe()}) but only {fmt_bytes(free)} of "
                f"{device.type} memory is free: {self.fix}, or use a 2-byte dtype (--dtype bfloat16)."
            )


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        # the device's free memory, plus what PyTorch's caching allocator holds unused (an earlier batch's
        # freed caches), which it hands out again before asking the device
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_cache_bytes(config: ModelConfig, kv_heads: int, batch: int, slots: int, dtype: torch.dtype) -> int:
    """Bytes of K and V buffers with `slots` slots per sequence (the trash slot included)."""
    return config.kv_bytes_per_token(dtype.itemsize, kv_heads) * batch * slots


def prefill_transient_bytes(model: Transformer, rows: int, chunk: int, capacity: int) -> int:
    """What a prefill forward holds beside the caches, at its largest: a chunk's visibility masks over the
    cache ([rows, chunk, capacity] booleans, built in a few steps) and the keys and values expanded to
    every query head for attention (SDPA does not materialise the scores)."""
    cfg = model.config
    heads = cfg.n_heads * model.kv_heads // cfg.n_kv_heads  # this device's query heads
    masks = 4 * rows * chunk * (capacity + 1)
    expanded = 2 * rows * heads * (capacity + 1) * cfg.head_dim * max(4, model.dtype.itemsize)
    return masks + expanded
