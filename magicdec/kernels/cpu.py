"""Batch-invariant CPU kernels for decode-shaped forwards (AVX2/FMA + OpenMP, C++ in ``csrc/``).

This module owns the Python side: building the extension lazily on first use (cached under
``$MAGICDEC_HOME/build``), deciding whether it can be used, and the public functions `linear`,
`linear_int8` (int8 weights with per-row scales, for quantized drafts), `attention` and `paged_attention`,
which fall back to PyTorch's ops when it cannot be used (no compiler, no AVX2/FMA, or
``MAGICDEC_CPU_KERNELS=0``). A fallback caused by a failed build or a CPU without AVX2 is announced by
one warning; the switch is silent.

Both kernels are *batch-invariant*: an output row is bitwise identical whatever the other rows of the
call, the batch size, the number of query tokens and the thread count. `linear` computes each output with
a fixed reduction order over K; `attention` processes keys in fixed blocks of slots and folds per-chunk
partial results in slot order (see the headers of ``csrc/linear.cpp`` and ``csrc/attention.cpp``);
`paged_attention` runs the same kernel over a paged cache and gives bitwise what `attention` gives on the
gathered dense cache. The fallbacks are not batch-invariant. Tensors may be float32, bfloat16 or float16
(one dtype per call): 16-bit weights, keys and values are widened to float32 as they are read, all
arithmetic is float32, and the result is rounded to the inputs' dtype element by element, so the 16-bit
paths are batch-invariant too.

Prebuild with ``python -m magicdec.kernels.cpu build`` (or `ensure_built()` from Python, e.g. before a
timed phase); ``python -m magicdec.kernels.cpu info`` says whether the kernels are in use and why not.
Compiling (once per source version) is announced on stderr. Builds are serialised between
processes by an advisory lock (``flock``) that the OS drops when its holder dies; the lock file of
``torch.utils.cpp_extension`` found while holding it was left by a build that was killed (e.g. its
terminal closed), so it is removed with a message instead of being waited on forever.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from magicdec.home.locks import exclusive, say
from magicdec.home.paths import magicdec_home

ENV_SWITCH = "MAGICDEC_CPU_KERNELS"  # "0" (or "false", "off", "no") disables the kernels
# Forwards with at most this many tokens per sequence are "decode-shaped" (decode, verification,
# drafting); longer ones (prefill chunks) are better served by MKL / SDPA, which are efficient at many rows.
MAX_DECODE_TOKENS = 16

EXTENSION_NAME = "magicdec_cpu_kernels"
SOURCES = ("bindings.cpp", "linear.cpp", "attention.cpp")
HEADERS = ("elements.h",)
CSRC = Path(__file__).resolve().parent / "csrc"
# -mavx2 -mfma rather than -march=native: the build cache may be shared by machines with different
# CPUs, and the kernels are written with AVX2/FMA intrinsics anyway. -ffp-contract=off keeps the
# compiler from fusing multiplies and adds on its own, so every code path rounds exactly as written
# (the basis of batch invariance). -mf16c: float16 → float32 conversion (every AVX2 CPU has F16C).
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)
# Page sizes of `paged_attention` must be multiples of this: the attention kernel's block of slots (kBlock
# in csrc/attention.cpp), so that every block of keys lies inside one page.
PAGE_MULTIPLE = 64
# The dtypes the kernels take (inputs of one call share one; arithmetic is float32 whatever it is).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BUILD_LOCK = "magicdec-build.lock"  # flock'ed by the process building or loading the extension
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's lock file: exists while a build runs (or after it was killed)

_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "tried": False, "reason": None, "build_s": None}


def build_dir() -> Path:
    """Where the extension is compiled and cached: one directory per torch version, Python version and
    version of the sources and flags, and where the sources are (a hash): two checkouts, or installs, never
    rebuild over each other's extension (the build files name the sources' paths, so a build directory shared
    by two checkouts of the same sources would be rebuilt by each in turn)."""
    digest = hashlib.sha256(repr((CFLAGS, LDFLAGS, str(CSRC.resolve()))).encode())
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    name = f"cpu_kernels-torch{torch.__version__}-{py}-{digest.hexdigest()[:12]}".replace("+", "_")
    return magicdec_home() / "build" / name


def enabled() -> bool:
    """False when ``MAGICDEC_CPU_KERNELS`` switches the kernels off (read on every call)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_reason() -> str | None:
    """Why this CPU cannot run the kernels, or None."""
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2" needs AVX2 and FMA; AVX512 includes both
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU lacks AVX2/FMA (PyTorch reports {capability})"
    return None


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Holds the exclusive build lock of `directory` (waiting, with a message, while another process
    holds it). It is an flock, which the OS releases when its holder exits or is killed, so it is never
    stale; then a torch lock file found in the directory was left by a killed build and is removed."""
    path = directory / BUILD_LOCK
    with exclusive(path, lambda f: f"waiting for another process that is building the CPU kernels (lock {path}) …"):
        stale = directory / TORCH_LOCK
        if stale.exists():  # every build holds our lock, so its owner is gone
            stale.unlink()
            say(f"removed a stale build lock left by an interrupted build ({stale})")
        yield


def _compile(verbose: bool) -> ModuleType:
    """Builds the extension in build_dir() (or loads the cached build), announcing a compile on stderr."""
    from torch.utils.cpp_extension import load

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        compiling = not (directory / f"{EXTENSION_NAME}.so").exists()
        if compiling:
            say("compiling the CPU kernels (once) …")
        start = time.perf_counter()
        module = load(
            name=EXTENSION_NAME,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=verbose,
        )
        if compiling:
            say(f"compiled the CPU kernels in {time.perf_counter() - start:.1f} s ({directory})")
    return module


def _load(verbose: bool = False) -> ModuleType | None:
    """The compiled extension, building it on first use; None (with one warning) if it cannot be had."""
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if not _state["tried"]:
            reason = _cpu_reason()
            module = None
            if reason is None:
                start = time.perf_counter()
                try:
                    module = _compile(verbose)
                    if not module.cpu_supported():
                        reason, module = "this CPU lacks AVX2/FMA/F16C", None
                except Exception as e:  # a missing compiler or ninja, a compile error, a locked cache ...
                    reason = f"building the extension failed ({type(e).__name__}: {str(e).strip()[:500]})"
                _state["build_s"] = time.perf_counter() - start
            _state["module"], _state["reason"], _state["tried"] = module, reason, True
            if reason is not None:
                warnings.warn(f"magicdec CPU kernels unavailable, using PyTorch ops instead: {reason}",
                              RuntimeWarning, stacklevel=3)
    return _state["module"]  # type: ignore[return-value]


def available() -> bool:
    """Whether `linear` and `attention` run the kernels (builds them on the first call)."""
    return enabled() and _load() is not None


def ensure_built(device: torch.device | str | None = None) -> bool:
    """Builds (on a first run, announced on stderr) or loads the kernels now rather than inside the first
    decode-shaped forward, e.g. before a timed phase; returns whether they are in use. Does nothing and
    returns False for a non-CPU `device` or when switched off. Cheap once done (no lock, no file access)."""
    if device is not None and torch.device(device).type != "cpu":
        return False
    return available()


def unavailable_reason() -> str | None:
    """Why the kernels are not used, or None when they are."""
    if not enabled():
        return f"switched off by {ENV_SWITCH}={os.environ.get(ENV_SWITCH)}"
    _load()
    return _state["reason"]  # type: ignore[return-value]


def build(verbose: bool = False) -> float:
    """Build (or load the cached build of) the extension now; returns the seconds it took.

    Raises RuntimeError if the kernels cannot be used on this machine."""
    start = time.perf_counter()
    if _load(verbose) is None:
        raise RuntimeError(f"magicdec CPU kernels unavailable: {_state['reason']}")
    return time.perf_counter() - start


def applies(x: torch.Tensor, tokens: int, max_tokens: int = MAX_DECODE_TOKENS) -> bool:
    """Whether a forward of `tokens` tokens per sequence on tensors like `x` should use these kernels:
    float32, bfloat16 or float16 on the CPU, decode-shaped (tokens <= max_tokens), no autograd, kernels
    available.

    Use one rule for every layer of a forward, and the same `max_tokens` for decoding, verification and
    drafting: outputs are bitwise consistent between forwards only if they all take the kernels."""
    return (
        tokens <= max_tokens
        and x.device.type == "cpu"
        and x.dtype in KERNEL_DTYPES
        and not (x.requires_grad and torch.is_grad_enabled())
        and available()
    )


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: on the CPU, one dtype of KERNEL_DTYPES, no autograd."""
    if not available():
        return False
    grad = torch.is_grad_enabled()
    dtype = tensors[0].dtype
    return dtype in KERNEL_DTYPES and all(
        t.device.type == "cpu" and t.dtype == dtype and not (grad and t.requires_grad) for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · weightᵀ + bias`` for x [..., K], weight [N, K], bias [N] or None → [..., N].

    With the kernels: bitwise batch-invariant (each output row depends only on its own input row), and
    streaming the weight once per call; float32 arithmetic, the result in x's dtype. Otherwise (kernels
    unavailable, tensors not on the CPU or not of one dtype in KERNEL_DTYPES, or autograd needed)
    ``F.linear``."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not _kernel_ok(*tensors):
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features but weight is {tuple(weight.shape)}")
    module = _state["module"]
    out = module.linear(x.reshape(-1, x.shape[-1]), weight, bias)  # type: ignore[attr-defined]
    return out.view(*x.shape[:-1], weight.shape[0])


def _check_int8_args(x: torch.Tensor, weight_q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    """ValueErrors naming what is wrong with the arguments of `linear_int8`."""
    if not x.is_floating_point():
        raise ValueError(f"linear_int8: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("linear_int8: x must be [..., K], got a scalar")
    if weight_q.dtype != torch.int8:
        raise ValueError(f"linear_int8: weight_q must be int8, got {weight_q.dtype}")
    if weight_q.dim() != 2:
        raise ValueError(f"linear_int8: weight_q must be [N, K], got {tuple(weight_q.shape)}")
    N, K = weight_q.shape
    if x.shape[-1] != K:
        raise ValueError(f"linear_int8: x has {x.shape[-1]} features but weight_q is {tuple(weight_q.shape)}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (N,):
        raise ValueError(f"linear_int8: scales must be float32 [{N}], got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and (tuple(bias.shape) != (N,) or not bias.is_floating_point()):
        raise ValueError(f"linear_int8: bias must be a floating-point [{N}] tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    devices = {t.device for t in (x, weight_q, scales) + (() if bias is None else (bias,))}
    if len(devices) > 1:
        raise ValueError(f"linear_int8: tensors on several devices: {sorted(str(d) for d in devices)}")


def dequantize_int8(weight_q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight `linear_int8` multiplies by: ``weight_q * scales[:, None]`` in float32, then in `dtype`."""
    return (weight_q.float() * scales[:, None]).to(dtype)


def linear_int8(x: torch.Tensor, weight_q: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x · weight_qᵀ) * scales + bias`` for x [..., K] (float32, bfloat16 or float16), weight_q [N, K] int8
    (symmetric quantization, one scale per output row), scales [N] float32, bias [N] or None → [..., N] in
    x's dtype.

    With the kernels: the int8 weight is streamed once per call (a quarter of the float32 bytes) and widened
    to float32 in registers; the dot product is the float32 `linear` kernel's (same fixed order), then times
    the row's scale, then + bias, all in float32; batch-invariant like `linear`. Otherwise (kernels
    unavailable or switched off, x not on the CPU or not of a KERNEL_DTYPES dtype, or autograd needed)
    ``F.linear`` on the weight dequantized for this call (`dequantize_int8`): correct but slower, since it
    materialises the full-precision weight each call. Raises ValueError for arguments of the wrong shape,
    dtype or device."""
    _check_int8_args(x, weight_q, scales, bias)
    if (available() and x.device.type == "cpu" and x.dtype in KERNEL_DTYPES
            and not (x.requires_grad and torch.is_grad_enabled())
            and not (bias is not None and bias.requires_grad and torch.is_grad_enabled())):
        module = _state["module"]
        out = module.linear_int8(x.reshape(-1, x.shape[-1]), weight_q, scales, bias)  # type: ignore[attr-defined]
        return out.view(*x.shape[:-1], weight_q.shape[0])
    return F.linear(x, dequantize_int8(weight_q, scales, x.dtype), None if bias is None else bias.to(x.dtype))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√D, where allowed) v with grouped-query heads.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D] (strided views of a larger cache are fine as long as D is
    contiguous; they are not copied); allowed [B, T, S] bool → [B, Hq, T, D]. Query head h uses KV head
    h // (Hq / Hkv). Every query row should see at least one slot (a row that sees none gets zeros from
    the kernel, NaN from the fallback).

    With the kernels: bitwise invariant to T, B and the other queries (and to S beyond the slots a row
    may see); float32 arithmetic, the result in q's dtype; D must be a multiple of 8. Otherwise SDPA with a
    boolean mask. `sinks` [Hq] (optional): attention sinks, a logit per query head in each softmax's denominator
    (GPT-OSS; without the kernels `attention_with_sinks`)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or allowed.dim() != 3:
        raise ValueError(f"attention: want q [B, Hq, T, D], k, v [B, Hkv, S, D], allowed [B, T, S]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(allowed.shape)}")
    if allowed.dtype != torch.bool:
        raise ValueError(f"attention: allowed must be a bool tensor, got {allowed.dtype}")
    if _kernel_ok(q, k, v) and q.shape[-1] % 8 == 0:
        return _state["module"].attention(q, k, v, allowed, sinks)  # type: ignore[attr-defined]
    if sinks is not None:
        return attention_with_sinks(q, k, v, allowed, sinks)
    Hq, Hkv = q.shape[1], k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=Hq != Hkv)


def attention_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                         sinks: torch.Tensor | None, softcap: float = 0.0) -> torch.Tensor:
    """softmax over [q kᵀ/√D where allowed, sink of the head] of v (the sink's value is zero), in float32 PyTorch:
    GPT-OSS's attention sinks (`sinks` [Hq] logits; None: none), and Gemma 2's soft-cap (`softcap` > 0: logits →
    softcap·tanh(logits / softcap) before the mask). Shapes as `attention`; a row that sees nothing gets zeros."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    s = torch.einsum("bhgtd,bhsd->bhgts", q.float().view(B, Hkv, g, T, D), k.float()) * D ** -0.5
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~allowed[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, Hkv, g, 1, 1).expand(B, Hkv, g, T, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhgts,bhsd->bhgtd", p.nan_to_num(0.0), v.float())
    return out.reshape(B, Hq, T, D).to(q.dtype)


def gather_pages(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The dense cache [B, Hkv, nb·P, D] of the pages `table` [B, nb] of `pool` [N, Hkv, P, D]:
    slot s of row b is pool[table[b, s // P], :, s % P] (a copy)."""
    B, nb = table.shape
    N, H, P, D = pool.shape
    return pool[table.long()].permute(0, 2, 1, 3, 4).reshape(B, H, nb * P, D)


def block_scores_reference(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, page: int,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """The block scores of `paged_attention` from dense keys (the gathered cache), in float64 math: per row b
    and page p (slots [p·page, (p+1)·page)), the largest attention probability softmax(q kᵀ/√D, where
    allowed) that any query head and token gives to a slot of the page (0 where none sees one; rows that
    see nothing add nothing). q [B, Hq, T, D], k [B, Hkv, S, D], allowed [B, T, S] → [B, S / page] float32,
    max-accumulated into `out` when given (the reference of the kernel, and the path without it)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    s = torch.einsum("bhgtd,bhsd->bhgts", q.double().view(B, Hkv, g, T, D), k.double()) / math.sqrt(D)
    s = s.masked_fill(~allowed[:, None, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row that sees nothing: 0
    fresh = p.amax((1, 2, 3)).view(B, S // page, page).amax(-1).float()
    if out is None:
        return fresh
    torch.maximum(out, fresh.to(out.device), out=out)
    return out


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                    allowed: torch.Tensor, block_scores: torch.Tensor | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`attention` over a paged KV cache.

    q [B, Hq, T, D]; k_pool, v_pool [N, Hkv, P, D]: one layer's pool of N pages of P slots (strided views
    such as ``pool[layer]`` are fine as long as D is contiguous; they are not copied); table [B, nb] int32
    or int64 page ids: logical slot s of row b is slot s % P of page table[b, s // P] (entries a row does
    not use hold any valid page id and are masked out); allowed [B, T, nb·P] bool over logical slots
    → [B, Hq, T, D]. P must be a positive multiple of PAGE_MULTIPLE (64), so that each block of keys
    of the kernel lies inside one page.

    With the kernels: bitwise equal to ``attention(q, K, V, allowed)`` on the gathered cache
    ``K = gather_pages(k_pool, table)`` (same for V), hence batch-invariant like it. Otherwise (kernels
    unavailable, tensors not eligible, or D not a multiple of 8) exactly that: the pages are gathered and
    `attention`'s fallback (SDPA with a boolean mask) runs.

    block_scores (optional) [B, nb] float32, with a contiguous last dimension: for each row b and page
    column p of its table, ``block_scores[b, p] = max(block_scores[b, p], s)`` where s is the largest
    attention probability (after the softmax, i.e. 2^(m_block − m_row) / l_row in the kernel's base-2
    terms) that any of the call's query heads and tokens (padding rows included) gives to a slot of that
    page, 0 where none sees one. Pass a zeroed buffer and the same one to every layer of a forward to get
    the max over layers too. The attention output is bitwise the same with or without it. Without the
    kernels it is computed by `block_scores_reference` (float64 softmax over the gathered keys)."""
    if q.dim() != 4 or k_pool.dim() != 4 or v_pool.dim() != 4 or table.dim() != 2 or allowed.dim() != 3:
        raise ValueError(f"paged_attention: want q [B, Hq, T, D], k_pool, v_pool [N, Hkv, P, D], table [B, nb], "
                         f"allowed [B, T, nb * P]; got {tuple(q.shape)}, {tuple(k_pool.shape)}, "
                         f"{tuple(v_pool.shape)}, {tuple(table.shape)}, {tuple(allowed.shape)}")
    if allowed.dtype != torch.bool:
        raise ValueError(f"paged_attention: allowed must be a bool tensor, got {allowed.dtype}")
    if table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"paged_attention: table must hold int32 or int64 page ids, got {table.dtype}")
    B, Hq, T, D = q.shape
    N, Hkv, P, _ = k_pool.shape
    nb = table.shape[1]
    if P <= 0 or P % PAGE_MULTIPLE:
        raise ValueError(f"paged_attention: the page size (P = {P} slots, k_pool.shape[2]) must be a positive "
                         f"multiple of {PAGE_MULTIPLE}, the kernel's block of slots")
    if v_pool.shape != k_pool.shape or k_pool.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit k_pool {tuple(k_pool.shape)} and "
                         f"v_pool {tuple(v_pool.shape)} (same shape, same D, Hq a multiple of Hkv)")
    if table.shape[0] != B or tuple(allowed.shape) != (B, T, nb * P):
        raise ValueError(f"paged_attention: want table [{B}, nb] and allowed [{B}, {T}, nb * {P}]; got "
                         f"{tuple(table.shape)} and {tuple(allowed.shape)}")
    if block_scores is not None and (block_scores.dtype != torch.float32 or tuple(block_scores.shape) != (B, nb)
                                     or (nb > 1 and block_scores.stride(1) != 1)
                                     or block_scores.device != q.device):
        raise ValueError(f"paged_attention: block_scores must be a float32 [{B}, {nb}] tensor on {q.device} with a "
                         f"contiguous last dimension, got {block_scores.dtype} {tuple(block_scores.shape)} on "
                         f"{block_scores.device}")
    if _kernel_ok(q, k_pool, v_pool) and D % 8 == 0:
        return _state["module"].paged_attention(q, k_pool, v_pool, table, allowed,  # type: ignore[attr-defined]
                                                block_scores, sinks)
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= N):
        raise ValueError(f"paged_attention: table holds page ids outside [0, {N})")
    k = gather_pages(k_pool, table)
    if block_scores is not None:
        block_scores_reference(q, k, allowed, P, block_scores)
    return attention(q, k, gather_pages(v_pool, table), allowed, sinks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magicdec.kernels.cpu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="compile the extension now (it is cached for later runs)")
    p_build.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    sub.add_parser("info", help="say whether the kernels are used, and why not")
    args = parser.parse_args(argv)
    if args.command == "build":
        if not enabled():
            print(f"note: {ENV_SWITCH}={os.environ.get(ENV_SWITCH)} switches the kernels off at run time")
        try:
            seconds = build(verbose=args.verbose)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"magicdec CPU kernels ready in {build_dir()} ({seconds:.1f} s)")
        return 0
    reason = unavailable_reason()
    print(f"build directory: {build_dir()}")
    print("CPU kernels: in use" if reason is None else f"CPU kernels: not used ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
