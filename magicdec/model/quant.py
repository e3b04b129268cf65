"""Weight-only int8 and int4 copies of a model, for drafting (QuantSpec-style self-speculation).

At small batch a decode step reads every weight, so a self-speculative draft over a sparse KV cache
costs nearly a target step. Drafting with the target's weights quantized to int8 reads a quarter of
the bytes (on the CPU: `magicdec.kernels.cpu.linear_int8`, 3–4.5x faster than the float32 kernel at
one row per call, ~2x at eight).

`quantize_weights(model, bits)` returns a NEW `Transformer` that shares everything with `model` (the same
embedding, norm, rotary and bias tensors, the same modules where nothing changes) except its linear
layers (wqkv, wo, w_gate_up, w_down and lm_head, a tied lm_head included: it gets its own quantized copy
of the embedding matrix), which become `QuantLinear` (int8) or `QuantLinear4` (int4) modules. The forward
code is the model's own; only modules are swapped. Whatever the model holds is quantized: a
tensor-parallel shard gives a quantized shard (head counts, `tp` and the communication hooks of the linear
layers are carried over).

int8 quantization is symmetric per output row: ``scale = max|w_row| / 127``, ``q = round(w / scale)`` in
[-127, 127], so ``w ≈ q * scale``.

int4 quantization is asymmetric per group of GROUP_SIZE (32) consecutive weights of a row, in the layout
of PyTorch's own int4 weight-only matmul ops ("tinygemm": `aten._weight_int4pack_mm_for_cpu` on the CPU,
`aten._weight_int4pack_mm` on CUDA, sm80+): codes ``q`` in [0, 15] and, per group, a bfloat16 scale
``s = (max - min) / 15`` and zero ``z = min + 8 s``, so ``w ≈ (q - 8) * s + z``; scales and zeros are
stored as one bfloat16 tensor [K/32, N, 2]. That is 0.5 + 4/32 bytes a weight. Those ops take bfloat16
activations (on the CPU the float32 variant of the op is a slow reference loop, ~30x slower than its
bfloat16 path, and float16 likewise), so `QuantLinear4` rounds x to bfloat16 for the op and returns the
result in x's dtype; a draft tolerates that rounding (~0.3% relative), far below the int4 error. K is
padded to a multiple of the group size and N to a multiple of 16 (the ops' tiling; the padded weights
are zero, x is padded with zeros per call). Where the op is missing or fails a one-time self-check on a
device, the codes are kept as plain nibbles and each call dequantizes the weight and runs ``F.linear``
(correct, slower).

`quantized_bytes(model, bits)` is the memory the quantized copy adds.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from magicdec.kernels import cpu as cpu_kernels
from magicdec.model.llama import Transformer

# Rows are quantized in chunks of about this many float32 bytes, so the extra peak memory stays small
# (the float32 copy of one chunk and its temporaries) even for the LM head or a 16-bit model.
CHUNK_BYTES = 16 << 20
SUPPORTED_BITS = (8, 4)
QMAX = 127  # symmetric int8: [-127, 127] (-128 unused, so that -q never overflows)
# int4: weights per (scale, zero) group along K, and the multiple N is padded to (the CPU op wants N % 16
# == 0, CUDA's N % 8). 32 and 64 run equally fast on the CPU; 32 is the finer (and the cost model's).
GROUP_SIZE = 32
INT4_ROWS = 16
# int4 codes are made (and packed for the op) this many rows at a time. The ops pack by blocks of rows (64
# on the CPU, 8 on CUDA; packing 32-row chunks on the CPU gives a different, wrong layout), so this is a
# multiple of those, and the self-check verifies that packing by such chunks gives the packing of the whole.
INT4_CHUNK_ROWS = 256

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
        if bits != 8:
            raise ValueError(f"QuantLinear is int8 (4 bits: QuantLinear4), got bits={bits}")
        weight_q, scales = quantize_int8(linear.weight)
        return _carry_hooks(linear, cls(weight_q, scales, linear.bias))

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


def _carry_hooks(linear: nn.Module, module: nn.Module) -> nn.Module:
    for name in _HOOK_DICTS:
        hooks = getattr(linear, name, None)
        if hooks:
            setattr(module, name, copy.copy(hooks))
    return module


# ---------------------------------------------------------------------------------------------- int4


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def int4_padded_shape(n: int, k: int, group_size: int = GROUP_SIZE) -> tuple[int, int]:
    """The [N, K] an int4 layer stores for an [n, k] weight: N a multiple of INT4_ROWS, K of the group."""
    return _round_up(n, INT4_ROWS), _round_up(k, group_size)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE,
                  pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] uint8 in [0, 15], scales_zeros [K/G, N, 2] bfloat16) of `weight` [n, k] on its device:
    asymmetric per group of `group_size` weights along K, ``w ≈ (q - 8) * s + z`` with ``s = (max - min) /
    15`` and ``z = min + 8 s`` rounded to bfloat16 first, the codes rounded to the nearest step of those
    rounded values. With `pad`, [N, K] is `int4_padded_shape` (zero weights in the padding); otherwise k
    must be a multiple of the group size and N, K are n, k."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int4: want a floating-point [N, K] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    N, K = int4_padded_shape(n, k, group_size) if pad else (n, k)
    if K % group_size:
        raise ValueError(f"quantize_int4: K={k} is not a multiple of the group size {group_size}")
    if (N, K) != (n, k):
        weight = F.pad(weight, (0, K - k, 0, N - n))
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    s = ((hi - lo) / 15).to(torch.bfloat16).float()
    z = (lo + 8 * s).to(torch.bfloat16).float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: q = 8, w = z (up to bfloat16 rounding)
    q = torch.round((w - z[..., None]) / s[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    sz = torch.stack([s, z], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return q.reshape(N, K), sz


def dequantize_int4(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int = GROUP_SIZE,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - 8) * s + z`` [N, K] in float32, then `dtype`, for codes [N, K] and scales_zeros [K/G, N, 2]."""
    N, K = codes.shape
    sz = scales_zeros.float()
    s, z = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [N, K/G, 1]
    w = (codes.reshape(N, K // group_size, group_size).float() - 8) * s + z
    return w.reshape(N, K).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15] → [N, K/2], column 2j in the low nibble and 2j + 1 in the high one."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: [N, K/2] → uint8 codes [N, K]."""
    return torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)


def _int4_op(device_type: str):  # noqa: ANN202 - an OpOverloadPacket or None
    name = {"cpu": "_weight_int4pack_mm_for_cpu", "cuda": "_weight_int4pack_mm"}.get(device_type)
    return None if name is None else getattr(torch.ops.aten, name, None)


def _inner_k_tiles(K: int) -> int:
    """CUDA's tiling of K (the CPU op ignores it): the largest of 8, 4, 2 with K a multiple of 16 times it."""
    return next(t for t in (8, 4, 2) if K % (16 * t) == 0)


def _pack_for_op(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] → the weight operand of the device's int4 op."""
    if codes.device.type == "cuda":  # uint8 [N, K/2], column 2j in the HIGH nibble (unlike pack_nibbles)
        hi_first = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(hi_first, _inner_k_tiles(codes.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _pack_rows(codes_of_rows, N: int, chunk_rows: int):  # noqa: ANN001, ANN202
    """The op's weight for N rows, packed `chunk_rows` at a time (codes_of_rows(a, b) → codes of rows a:b)."""
    return torch.cat([_pack_for_op(codes_of_rows(a, min(N, a + chunk_rows))) for a in range(0, N, chunk_rows)])


def _codes_from_op(packed: torch.Tensor, N: int, K: int, group_size: int) -> torch.Tensor:
    """The codes [N, K] behind an op-packed weight: the op applied to the identity with unit scales and
    zeros 8 gives ``(q - 8) * 1 + 8 = q`` exactly (small integers are exact in bfloat16)."""
    dev = packed.device
    unit = torch.stack([torch.ones(K // group_size, N, device=dev), torch.full((K // group_size, N), 8.0, device=dev)],
                       -1).to(torch.bfloat16)
    eye = torch.eye(K, dtype=torch.bfloat16, device=dev)
    return _int4_op(dev.type)(eye, packed, group_size, unit).t().float().round().to(torch.uint8).contiguous()


_INT4_KERNEL: dict[str, bool] = {}  # device → whether its int4 op passed the self-check


def int4_kernel_available(device: torch.device | str) -> bool:
    """Whether `device` has PyTorch's int4 weight-only matmul (the CPU's, or CUDA's on sm80+) and it passes a
    one-time self-check here: a random weight quantized, packed (by chunks of rows, as QuantLinear4 packs)
    and multiplied must match the dequantized reference, and the codes must be recoverable from the packed
    weight. A failure is announced by one warning; the layers then dequantize per call."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _INT4_KERNEL:
        _INT4_KERNEL[key] = _int4_self_check(device)
    return _INT4_KERNEL[key]


@torch.no_grad()
def _int4_self_check(device: torch.device) -> bool:
    op = _int4_op(device.type)
    if op is None or (device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0)):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        N, K, rows = INT4_CHUNK_ROWS + 80, 128, INT4_CHUNK_ROWS  # a partial chunk last: 64 + 16 rows
        w = torch.randn(N, K, generator=g).to(device)
        codes, sz = quantize_int4(w)
        packed = _pack_rows(lambda a, b: codes[a:b], N, rows)
        same_packing = torch.equal(packed, _pack_for_op(codes))
        x = torch.randn(3, K, generator=g).to(device, torch.bfloat16)
        y = op(x, packed, GROUP_SIZE, sz).float()
        ref = x.float() @ dequantize_int4(codes, sz).t()
        err = ((y - ref).norm() / ref.norm()).item()
        codes_back = torch.equal(_codes_from_op(packed, N, K, GROUP_SIZE), codes)
        ok = same_packing and err < 2e-2 and codes_back
        why = f"packing by chunks {'agrees' if same_packing else 'differs'}, relative error {err:.2e}, codes " \
              f"{'recovered' if codes_back else 'not recovered'}"
    except Exception as e:  # noqa: BLE001 - any failure means: don't use the op
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        warnings.warn(f"magicdec: PyTorch's int4 matmul on {device} failed its self-check ({why}); int4 layers "
                      "there dequantize their weights on every call (correct, slower)", stacklevel=3)
    return ok


class QuantLinear4(nn.Module):
    """A linear layer with an int4 weight (group-wise asymmetric, see the module docstring):
    ``y = x · ((q - 8) * s + z)ᵀ + bias``.

    With `kernel` (PyTorch's int4 op on the weight's device, see `int4_kernel_available`), `weight_packed`
    is that op's packed weight and a call runs the op on x rounded to bfloat16 (padded to the stored K),
    the result back in x's dtype, then + bias; an input on another device, or a layer without `kernel`
    (`weight_packed` then holds `pack_nibbles` codes), takes `forward_dequantized`: ``F.linear`` on the
    weight dequantized for that call."""

    weight_packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, weight_packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, kernel: bool = False, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        G = group_size
        if scales_zeros.dtype != torch.bfloat16 or scales_zeros.dim() != 3 or scales_zeros.shape[2] != 2:
            raise ValueError(f"QuantLinear4: scales_zeros must be bfloat16 [K/{G}, N, 2], got {scales_zeros.dtype} "
                             f"{tuple(scales_zeros.shape)}")
        self.padded_in, self.padded_out = scales_zeros.shape[0] * G, scales_zeros.shape[1]
        if (self.padded_out, self.padded_in) != int4_padded_shape(out_features, in_features, G):
            raise ValueError(f"QuantLinear4: scales_zeros {tuple(scales_zeros.shape)} do not fit a [{out_features}, "
                             f"{in_features}] weight in groups of {G}")
        if not kernel and (weight_packed.dtype != torch.uint8
                           or tuple(weight_packed.shape) != (self.padded_out, self.padded_in // 2)):
            raise ValueError(f"QuantLinear4: weight_packed must be uint8 [{self.padded_out}, {self.padded_in // 2}] "
                             f"(pack_nibbles), got {weight_packed.dtype} {tuple(weight_packed.shape)}")
        self.in_features, self.out_features, self.group_size, self.kernel = in_features, out_features, G, kernel
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = bias  # the original's parameter (shared), or None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, kernel: bool | None = None) -> QuantLinear4:
        """The int4 counterpart of `linear` (sharing its bias, carrying over its forward hooks), packed for
        its device's int4 op when `kernel` (default: when `int4_kernel_available` there). Codes are made
        INT4_CHUNK_ROWS rows at a time, so the extra peak memory is a chunk's float32 copy."""
        w = linear.weight
        n, k = w.shape
        N, K = int4_padded_shape(n, k)
        if kernel is None:
            kernel = int4_kernel_available(w.device)
        sz = torch.empty(K // GROUP_SIZE, N, 2, dtype=torch.bfloat16, device=w.device)
        rows = INT4_CHUNK_ROWS

        def codes_of_rows(a: int, b: int) -> torch.Tensor:  # rows a:b of the padded weight
            chunk = w[a:b]  # fewer than b - a rows (maybe none) where the padding starts
            chunk = F.pad(chunk, (0, K - k, 0, b - a - chunk.shape[0]))
            codes, sz[:, a:b] = quantize_int4(chunk, pad=False)
            return codes

        if kernel:
            packed = _pack_rows(codes_of_rows, N, rows)
        else:
            packed = torch.cat([pack_nibbles(codes_of_rows(a, min(N, a + rows))) for a in range(0, N, rows)])
        return _carry_hooks(linear, cls(packed, sz, k, n, linear.bias, kernel))  # type: ignore[return-value]

    def codes(self) -> torch.Tensor:
        """The codes [N, K] in [0, 15] (padded shape), from either storage."""
        if self.kernel:
            return _codes_from_op(self.weight_packed, self.padded_out, self.padded_in, self.group_size)
        return unpack_nibbles(self.weight_packed)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out_features, in_features] this layer multiplies by, ``(q - 8) * s + z`` (float32,
        then `dtype`)."""
        w = dequantize_int4(self.codes(), self.scales_zeros, self.group_size, dtype or torch.float32)
        return w[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel or x.device != self.weight_packed.device:
            return self.forward_dequantized(x)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        y = _int4_op(x.device.type)(x2.contiguous(), self.weight_packed, self.group_size, self.scales_zeros)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` on the weight dequantized for this call, in x's dtype (without the op: correct, slower)."""
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, self.dequantized(x.dtype).to(x.device), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4 group {self.group_size}, {'int4 op' if self.kernel else 'dequantized per call'}")


# ---------------------------------------------------------------------------------------------- the model


def _quantized_linear(linear: nn.Linear, bits: int) -> nn.Module:
    return QuantLinear.from_linear(linear) if bits == 8 else QuantLinear4.from_linear(linear)


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def _quantized_tree(module: nn.Module, bits: int, done: dict[int, nn.Module]) -> nn.Module:
    """`module` with its nn.Linear layers replaced by QuantLinear (QuantLinear4 for 4 bits): a module with no
    linear layer inside is returned itself (shared); one with some is copied shallowly (same attributes,
    parameters and buffers, fresh registries) with its children processed likewise. `done` maps modules
    already processed (a module reachable twice is converted once)."""
    key = id(module)
    if key in done:
        return done[key]
    if isinstance(module, nn.Linear):
        new: nn.Module = _quantized_linear(module, bits)
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
    """A new Transformer computing `model`'s forward with int8 (`bits` 8) or int4 (`bits` 4) linear layers
    (see the module docstring).

    Shares the embedding, norms, rotary buffers and biases with `model` (no copy); the quantized weights
    and their scales are made on `model`'s device, a chunk of rows at a time. `model` itself is unchanged."""
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
    if bits == 4:  # padded codes, half a byte each, + a bfloat16 scale and zero per group
        N, K = int4_padded_shape(n, k)
        return N * K // 2 + (K // GROUP_SIZE) * N * 4
    return n * k * bits // 8 + n * 4  # weights + one float32 scale per row


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantized_bytes(model: nn.Module, bits: int = 8) -> int:
    """The memory, in bytes, that a quantized copy of `model` adds to it: the quantized weights and their
    scales (int8: float32 per row; int4: bfloat16 scale and zero per group of 32) of every linear layer it
    holds (a tied LM head counts, as it gets its own copy). Works on a model before quantization (on any
    device, also "meta") and on a quantized one (then it counts the QuantLinear / QuantLinear4 tensors it
    holds)."""
    _check_bits(bits)
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += _nbytes(m.weight_q) + _nbytes(m.scales)
        elif isinstance(m, QuantLinear4):
            total += _nbytes(m.weight_packed) + _nbytes(m.scales_zeros)
        elif isinstance(m, nn.Linear):
            total += _linear_bytes(*m.weight.shape, bits)
    return total
