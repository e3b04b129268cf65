"""Which hardware profile describes the device we run on: one that `magicdec profile` measured and
saved for this device and model, else the built-in datasheet profile matching the device's name."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from magicdec.config import ModelConfig
from magicdec.costmodel.hardware import BUILTIN_PROFILES, HardwareProfile, load_profile
from magicdec.home.paths import magicdec_home

# substrings of torch.cuda.get_device_name → built-in profile
_GPU_NAMES = (("h200", "h200"), ("h100", "h100"), ("a100-sxm4-80gb", "a100-80gb"), ("a100 80gb", "a100-80gb"),
              ("a100", "a100-40gb"), ("l40s", "l40s"))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1] for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return slug(f"cpu {model} {torch.get_num_threads()}t")


def saved_profile_path(device: torch.device, config: ModelConfig, dtype: torch.dtype) -> Path:
    dt = str(dtype).removeprefix("torch.")
    return magicdec_home() / "profiles" / f"{device_name(device)}--{slug(config.name or 'model')}--{dt}.json"


def device_profile(device: torch.device, config: ModelConfig, dtype: torch.dtype | None = None) -> HardwareProfile:
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    saved = saved_profile_path(device, config, dtype)
    if saved.is_file():
        return load_profile(saved)
    return BUILTIN_PROFILES[builtin_profile_name(device)]


def builtin_profile_name(device: torch.device) -> str:
    """The built-in (datasheet) profile for this device: a GPU by its name (h100 if unknown), or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((profile for key, profile in _GPU_NAMES if key in name), "h100")
