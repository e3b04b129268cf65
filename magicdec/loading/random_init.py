"""Models with random weights, for systems benchmarks and device checks of large shapes without
their checkpoints (e.g. `benchmarks/gpu_check.py` times a Llama-3.1-8B-shaped model). Their
tokenizer is a word-level vocabulary "w0 … w{V-1}": enough to decode, nothing to read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from magicdec.config import ModelConfig
from magicdec.loading import LoadedModel
from magicdec.loading.tokenizer import Tokenizer
from magicdec.model.llama import RMSNorm, Transformer
from magicdec.model.rope import RotaryEmbedding

INIT_STD = 0.02  # the usual initializer range of Llama configs


def random_model(cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A model of `cfg`'s shape with N(0, 0.02) weights and unit norms, built directly on `device`."""
    model = Transformer(cfg, device="meta").to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, INIT_STD, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.rope = RotaryEmbedding(cfg).to(device)  # to_empty left the buffer uninitialised
    return model.eval().requires_grad_(False)


def word_vocabulary(vocab_size: int) -> Any:
    """A `tokenizers` word-level tokenizer over the words w0 … w{V-1}, so random models decode to text."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return backend


def word_tokenizer(vocab_size: int) -> Tokenizer:
    return Tokenizer(word_vocabulary(vocab_size), {"bos_token": None, "eos_token": None}, None)


def random_loaded_model(cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype,
                        seed: int = 0) -> LoadedModel:
    return LoadedModel(random_model(cfg, device, dtype, seed), word_tokenizer(cfg.vocab_size), cfg,
                       Path(f"random:{cfg.name or 'model'}"))
