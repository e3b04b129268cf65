"""Hugging Face checkpoint directories: config.json plus model.safetensors, or sharded safetensors
with their index. Tensors are read one at a time through `safe_open`, never all at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from magicdec.config import ConfigError, ModelConfig
from magicdec.loading import mxfp4
from magicdec.loading.assemble import build_model
from magicdec.loading.errors import LoadError
from magicdec.model.llama import Transformer
from magicdec.parallel.tp import TensorParallel


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LoadError(f"{path} has no config.json; expected a Hugging Face checkpoint directory")
    raw = _read_json(cfg_file)
    gen_file = path / "generation_config.json"
    if gen_file.is_file():  # generation_config's eos list (e.g. Llama-3's <|eot_id|>) takes precedence
        eos = _read_json(gen_file).get("eos_token_id")
        if eos is not None:
            raw = {**raw, "eos_token_id": eos}
    try:
        return ModelConfig.from_hf(raw, name=raw.get("_name_or_path") or path.name)
    except ConfigError as e:
        raise LoadError(f"{cfg_file}: {e}") from None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{file} is not valid JSON: {e}") from None


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index)["weight_map"]
        files = {name: path / fname for name, fname in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise LoadError(f"{index} lists shards that are missing: {', '.join(absent)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return dict.fromkeys(open_safetensors(single).keys(), single)
    if list(path.glob("*.bin")) or list(path.glob("*.pth")):
        raise LoadError(
            f"{path} holds PyTorch pickle weights (*.bin); magicdec reads safetensors only. Convert them "
            "with transformers (`model.save_pretrained(dir, safe_serialization=True)`)."
        )
    raise LoadError(f"{path} has no model.safetensors nor model.safetensors.index.json")


def open_safetensors(file: Path) -> Any:
    """`safe_open(file)`, or a LoadError naming the file when it is truncated or not safetensors at all."""
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # SafetensorError, OSError: a header that does not parse or does not fit the file
        raise LoadError(f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt: "
                        "download or convert it again") from None


def load_hf(path: Path, dtype: torch.dtype, device: torch.device | str,
            tp: TensorParallel | None = None) -> tuple[Transformer, ModelConfig]:
    """Load a checkpoint directory; with `tp`, read only this rank's slice of each sharded tensor."""
    cfg = read_config(path)
    files = weight_files(path)
    handles: dict[Path, Any] = {}
    packed = mxfp4.packed_names(set(files))  # (GPT-OSS's MXFP4 experts: dequantized here)
    names = {n for n in files if not any(n.endswith(s) and n[: -len(s)] in packed for s in mxfp4.SUFFIXES)}

    def get(name: str, part: tuple[int, int, int] | None = None) -> torch.Tensor | None:
        if name in packed:  # dequantized whole, then this rank's part taken
            blocks, scales = (get(n) for n in packed[name])
            assert blocks is not None and scales is not None
            try:
                t = mxfp4.dequantize(blocks, scales)
            except ValueError as e:
                raise LoadError(f"{path}: tensor {name!r}: {e}") from None
            return t if part is None else t.narrow(part[0], part[1], part[2] - part[1]).clone()
        f = files.get(name)
        if f is None:
            return None
        if f not in handles:
            handles[f] = open_safetensors(f)
        try:
            if part is None:
                return handles[f].get_tensor(name)
            dim, a, b = part
            return handles[f].get_slice(name)[(slice(None),) * dim + (slice(a, b),)]
        except Exception as e:
            raise LoadError(f"{f}: cannot read tensor {name!r} ({e}); the file is corrupt") from None

    return build_model(cfg, get, dtype, device, source=str(path), tp=tp, sliced=True, names=names | set(packed)), cfg
