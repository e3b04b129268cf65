"""Weight-only int8 copies of a model, for drafting (QuantSpec-style self-speculation).

At small batch a decode step reads every weight, so a self-speculative draft over a sparse KV cache
costs nearly a target step. Drafting with the target's weights quantized to int8 reads a quarter of
the bytes (on the CPU: `magicdec.kernels.cpu.linear_int8`, 3–4.5x faster than the float32 kernel at
one row per call, ~2x at eight).

`quantize_weights(model)` returns a NEW `Transformer` that shares everything with `model` (the same
embedding, norm, rotary and bias tensors, the same modules where nothing changes) except its linear
layers (wqkv, wo, w_gate_up, w_down and lm_head, a tied lm_head included: it gets its own int8 copy of
the embedding matrix), which become `QuantLinear` modules. The forward code is the model's own; only
modules are swapped. Whatever the model holds is quantized: a tensor-parallel shard gives a quantized
shard (head counts, `tp` and the communication hooks of the linear layers are carried over).

Quantization is symmetric per output row: ``scale = max|w_row| / 127``, ``q = round(w / scale)`` in
[-127, 127], so ``w ≈ q * scale``. `quantized_bytes(model)` is the memory the quantized copy adds.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from magicdec.kernels import cpu as cpu_kernels
from magicdec.model.llama import Transformer

# Rows are quantized in chunks of about this many float32 bytes, so the extra peak memory stays small
# (the float32 copy of one chunk and its temporaries) even for the LM head or a 16-bit model.
CHUNK_BYTES = 16 << 20
SUPPORTED_BITS = (8,)
QMAX = 127  # symmetric int8: [-127, 127] (-128 unused, so that -q never overflows)

# The hook registries of a module that a replacement carries over (TP's all-reduce / all-gather hooks).
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization to {bits} bits is not supported (supported: {SUPPORTED_BITS})")


@torch.no_grad()
def quantize_int8(weight: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_q [N, K] int8, scales [N] float32) of `weight` [N, K], on its device: symmetric per row,
    ``scales = max|w_row| / 127`` (0 for an all-zero row) and ``weight_q = round(w / scale)``. Works through
    the rows in chunks of ~`chunk_bytes` of float32."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8: want a floating-point [N, K] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scales = torch.empty(N, dtype=torch.float32, device=weight.device)
    rows = max(1, chunk_bytes // max(1, 4 * K))
    tiny = torch.finfo(torch.float32).tiny
    for a in range(0, N, rows):
        w = weight[a : a + rows].float()
        s = w.abs().amax(dim=1) / QMAX if K else torch.zeros(w.shape[0], device=w.device)
        q[a : a + rows] = torch.round(w / s.clamp_min(tiny)[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        scales[a : a + rows] = s
    return q, scales


class QuantLinear(nn.Module):
    """A linear layer with an int8 weight: ``y = (x · weight_qᵀ) * scales + bias``.

    On the CPU it runs `magicdec.kernels.cpu.linear_int8` for any number of tokens (the int8 kernel when
    the kernels are available, batch-invariant like the float32 one; otherwise PyTorch on the weight
    dequantized for that call). On other devices (CUDA) it dequantizes the weight on every call and runs
    ``F.linear``: simple and correct, but it reads the int8 weight and writes and reads a full-precision
    copy, so it saves memory, not time (no CUDA int8 kernel yet)."""

    weight_q: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight_q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise ValueError(f"QuantLinear: weight_q must be int8 [N, K], got {weight_q.dtype} "
                             f"{tuple(weight_q.shape)}")
        if scales.dtype != torch.float32 or tuple(scales.shape) != (weight_q.shape[0],):
            raise ValueError(f"QuantLinear: scales must be float32 [{weight_q.shape[0]}], got {scales.dtype} "
                             f"{tuple(scales.shape)}")
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("scales", scales)
        self.bias = bias  # the original's parameter (shared), or None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8) -> QuantLinear:
        """The quantized counterpart of `linear` (sharing its bias and carrying over its forward hooks)."""
        _check_bits(bits)
        weight_q, scales = quantize_int8(linear.weight)
        module = cls(weight_q, scales, linear.bias)
        for name in _HOOK_DICTS:
            hooks = getattr(linear, name, None)
            if hooks:
                setattr(module, name, copy.copy(hooks))
        return module

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer multiplies by, ``weight_q * scales`` (float32, then `dtype`)."""
        return cpu_kernels.dequantize_int8(self.weight_q, self.scales, dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return cpu_kernels.linear_int8(x, self.weight_q, self.scales, self.bias)
        return self.forward_dequantized(x)

    def forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """The path off the CPU: ``F.linear`` on the weight dequantized for this call, in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def _quantized_tree(module: nn.Module, bits: int, done: dict[int, nn.Module]) -> nn.Module:
    """`module` with its nn.Linear layers replaced by QuantLinear: a module with no linear layer inside is
    returned itself (shared); one with some is copied shallowly (same attributes, parameters and buffers,
    fresh registries) with its children processed likewise. `done` maps modules already processed (a
    module reachable twice is converted once)."""
    key = id(module)
    if key in done:
        return done[key]
    if isinstance(module, nn.Linear):
        new: nn.Module = QuantLinear.from_linear(module, bits)
    elif not _has_linear(module):
        new = module
    else:
        new = copy.copy(module)  # copies __dict__: attributes (head counts, layer index, config, tp) shared
        for name, value in vars(module).items():
            if isinstance(value, (dict, set)):  # parameters, buffers, modules, hooks: own registries
                new.__dict__[name] = copy.copy(value)
        for name, child in module._modules.items():
            new._modules[name] = None if child is None else _quantized_tree(child, bits, done)
    done[key] = new
    return new


@torch.no_grad()
def quantize_weights(model: Transformer, bits: int = 8) -> Transformer:
    """A new Transformer computing `model`'s forward with int8 linear layers (see the module docstring).

    Shares the embedding, norms, rotary buffers and biases with `model` (no copy); the int8 weights and
    their scales are made on `model`'s device, a chunk of rows at a time. `model` itself is unchanged."""
    _check_bits(bits)
    if not isinstance(model, Transformer):
        raise TypeError(f"quantize_weights: want a magicdec Transformer, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.device.type == "meta":
            raise ValueError("quantize_weights: the model has no weights yet (meta tensors)")
    new = _quantized_tree(model, bits, {})
    assert isinstance(new, Transformer)
    return new


def _linear_bytes(n: int, k: int, bits: int) -> int:
    _check_bits(bits)
    return n * k * bits // 8 + n * 4  # weights + one float32 scale per row


def quantized_bytes(model: nn.Module, bits: int = 8) -> int:
    """The memory, in bytes, that a quantized copy of `model` adds to it: int8 weights and float32 row
    scales of every linear layer it holds (a tied LM head counts, as it gets its own copy). Works on a
    model before quantization (on any device, also "meta") and on a quantized one (then it counts the
    QuantLinear tensors it holds)."""
    _check_bits(bits)
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_q.numel() * m.weight_q.element_size() + m.scales.numel() * m.scales.element_size()
        elif isinstance(m, nn.Linear):
            total += _linear_bytes(*m.weight.shape, bits)
    return total
