"""Argument types and flag groups shared by the sub-commands: counts, sizes, γ, and the speculation flags.

Every parser raises `argparse.ArgumentTypeError` with the value and what is expected, so argparse
prints "argument --flag: …" naming the flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from magicdec.costmodel.hardware import load_profile
from magicdec.spec.config import DRAFT_WEIGHTS, DRAFTERS, KV_SOURCES, METHODS, Auto, DraftTuning, SpecConfig

SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_count(text: str) -> int:
    """'4096', '4k' or '1.5K' (k = ×1024) → a positive whole number."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * 1024 if t.endswith("k") else float(t)
    except ValueError:
        value = -1.0
    if value != value or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number (optionally with a k suffix = ×1024), "
                                         f"got {text!r}")
    return int(value)


def parse_size(text: str) -> int:
    """'8G', '8GiB', '512m' or a plain number of bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        n = float(t[:-1]) * SIZE_UNITS[t[-1]] if t and t[-1] in SIZE_UNITS else float(t)
    except ValueError:
        n = -1.0
    if n != n or n < 1:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 8GiB, 512m or 1000000, got {text!r}")
    return int(n)


def parse_gamma(text: str) -> int | Auto:
    """A positive γ, or 'auto'."""
    if text.strip().lower() == "auto":
        return Auto()
    try:
        return parse_count(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number of draft tokens or 'auto', got {text!r}") \
            from None


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """The speculation flags of `generate` (SpecConfig's fields, its research knobs in a group of their own)."""
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--spec", choices=METHODS, default="none", help="none, self (sparse-KV self-draft) or draft")
    d.add_argument("--drafter", choices=DRAFTERS, default="streaming", help="the draft's KV (default streaming)")
    d.add_argument("--gamma", type=parse_gamma, default=3, help="draft tokens per round, or 'auto'")
    d.add_argument("--budget", type=parse_count, default=512, help="draft KV budget in tokens (default 512)")
    d.add_argument("--sinks", type=int, default=16, help="streaming: attention-sink tokens (default 16)")
    d.add_argument("--draft-model", help="with --spec draft: a smaller model sharing the tokenizer")
    d.add_argument("--draft-weights", choices=DRAFT_WEIGHTS, default="full",
                   help="with --spec self: draft with the target's weights as they are, or quantized to int8 or int4")
    r = p.add_argument_group("speculation research knobs")
    r.add_argument("--draft-kv", choices=KV_SOURCES, default="target",
                   help="self: build the draft cache from the target's KV, or let the draft compute its own")
    r.add_argument("--profile", help="--gamma auto: hardware profile (built-in name or JSON from magicdec profile)")


def spec_from_args(args: Any) -> SpecConfig:
    """The CLI's SpecConfig (the Python API reaches every knob: `Auto(max_gamma=…)`, `DraftTuning(…)`),
    with the files it names checked before any model loads."""
    gamma = Auto(profile=args.profile) if isinstance(args.gamma, Auto) else args.gamma
    spec = SpecConfig(method=args.spec, drafter=args.drafter, gamma=gamma, budget=args.budget, sinks=args.sinks,
                      draft_model=args.draft_model, tuning=DraftTuning(kv_source=args.draft_kv),
                      draft_weights=args.draft_weights)
    if args.profile:
        load_profile(args.profile)  # raises, naming the profile, if it is neither built in nor a readable file
    if spec.draft_model and not Path(spec.draft_model).expanduser().exists():
        raise ValueError(f"--draft-model {spec.draft_model}: no such file or directory")
    return spec
