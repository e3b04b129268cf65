"""Argument types and flag groups shared by the sub-commands: counts, sizes, γ, and the speculation flags.

Every parser raises `argparse.ArgumentTypeError` with the value and what is expected, so argparse
prints "argument --flag: …" naming the flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from magicdec.costmodel.hardware import load_profile
from magicdec.spec.config import DRAFT_WEIGHTS, DRAFTERS, KV_SOURCES, METHODS, Auto, DraftTuning, SpecConfig

BLOCK_SIZE = 64  # tokens per block of the paged KV cache the CLI's engines use (`LLM.engine_core`'s default)
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


SPEC_DEFAULTS = {"drafter": "streaming", "gamma": 3, "budget": 512, "sinks": 16, "draft_weights": "full",
                 "draft_kv": "target"}


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """The speculation flags of `generate` and `serve` (SpecConfig's fields, its research knobs in a group of their
    own). Their defaults are filled in by `spec_from_args`, which can so tell a flag given from a default."""
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--spec", choices=METHODS, default="none", help="none, self (sparse-KV self-draft) or draft")
    d.add_argument("--drafter", choices=DRAFTERS,
                   help="the draft's KV (streaming, the default; snapkv; guided; full for a draft model), or a draft "
                        "without a model: ngram (prompt lookup), suffix (suffix matching), hybrid (each round per "
                        "request, a suffix proposal or the streaming self-draft, as the cost model expects best)")
    d.add_argument("--gamma", type=parse_gamma, help="draft tokens per round, or 'auto' (default 3); ngram, suffix: "
                   "the longest proposal (e.g. 8)")
    d.add_argument("--budget", type=parse_count, help="draft KV budget in tokens (default 512; cut to the context)")
    d.add_argument("--sinks", type=int, help="streaming: attention-sink tokens (default 16)")
    d.add_argument("--draft-model", help="with --spec draft: a smaller model sharing the tokenizer")
    d.add_argument("--draft-weights", choices=DRAFT_WEIGHTS,
                   help="with --spec self: draft with the target's weights as they are (full, the default), or "
                        "quantized to int8 or int4")
    r = p.add_argument_group("speculation research knobs")
    r.add_argument("--draft-kv", choices=KV_SOURCES,
                   help="self: build the draft cache from the target's KV (target, the default), or let the draft "
                        "compute its own")
    r.add_argument("--profile", help="--gamma auto: hardware profile (built-in name or JSON from magicdec profile)")


def idle_spec_flags(args: Any) -> list[str]:
    """The speculation flags given that would change nothing: any without --spec, --sinks beside a drafter other
    than streaming, --budget with the full drafter, --profile without --gamma auto."""
    given = [k for k in (*SPEC_DEFAULTS, "profile") if getattr(args, k) is not None]
    if args.spec == "none":
        idle = given
    else:
        drafter = args.drafter or SPEC_DEFAULTS["drafter"]
        model_free = drafter in ("ngram", "suffix")
        streaming = drafter in ("streaming", "hybrid")
        idle = [k for k in given if (k == "sinks" and not streaming) or (k == "budget" and drafter in ("full", "ngram",
                                                                                                     "suffix"))
                or (k in ("draft_weights", "draft_kv") and model_free)
                or (k == "profile" and not isinstance(args.gamma, Auto))]
    return ["--" + k.replace("_", "-") for k in idle]


def spec_from_args(args: Any) -> SpecConfig:
    """The CLI's SpecConfig (the Python API reaches every knob: `Auto(max_gamma=…)`, `DraftTuning(…)`),
    with the files it names checked, and flags that would do nothing refused, before any model loads."""
    idle = idle_spec_flags(args)
    if idle:
        why = ("speculation is off: add --spec self (or --spec draft)" if args.spec == "none" else
               "it changes nothing here (--sinks: the streaming drafter; --budget: a sparse drafter; --draft-weights, "
               "--draft-kv: a drafting model, not ngram or suffix; --profile: --gamma auto)")
        raise ValueError(f"{', '.join(idle)} would do nothing, as {why}, or drop {'it' if len(idle) == 1 else 'them'}")
    v = {k: d if getattr(args, k) is None else getattr(args, k) for k, d in SPEC_DEFAULTS.items()}
    gamma = Auto(profile=args.profile) if isinstance(v["gamma"], Auto) else v["gamma"]
    spec = SpecConfig(method=args.spec, drafter=v["drafter"], gamma=gamma, budget=v["budget"], sinks=v["sinks"],
                      draft_model=args.draft_model, tuning=DraftTuning(kv_source=v["draft_kv"]),
                      draft_weights=v["draft_weights"])
    if args.profile:
        load_profile(args.profile)  # raises, naming the profile, if it is neither built in nor a readable file
    if spec.draft_model and not Path(spec.draft_model).expanduser().exists():
        raise ValueError(f"--draft-model {spec.draft_model}: no such file or directory")
    if spec.enabled and spec.drafter not in ("full", "ngram", "suffix") and spec.budget < spec.min_budget(BLOCK_SIZE):
        raise ValueError(f"--budget {spec.budget} is too small for the {spec.drafter} drafter: it needs "
                         f"--budget ≥ {spec.min_budget(BLOCK_SIZE)}{budget_reason(spec)}")
    return spec


def budget_reason(spec: SpecConfig) -> str:
    if spec.drafter in ("streaming", "hybrid"):
        return f" (its {spec.sinks} sinks and a recent window; or fewer --sinks)"
    if spec.drafter == "guided":
        return f" (the sink block, a selected block of {BLOCK_SIZE} tokens and its recent window)"
    return " (selected positions and a recent window)"


def fit_budget(spec: SpecConfig, context: int, command: str) -> SpecConfig:
    """`spec` with its budget cut to `context` tokens, saying so in one line on stderr when it is cut."""
    fitted = spec.fitted(context, BLOCK_SIZE)
    if fitted is not spec and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0 says it
        print(f"magicdec {command}: --budget {spec.budget} is more than the longest context ({context} tokens): "
              f"using --budget {fitted.budget}", file=sys.stderr)
    return fitted
