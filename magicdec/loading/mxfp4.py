"""MXFP4 weights (the OCP microscaling format GPT-OSS's experts are published in), dequantized at load.

A checkpoint stores an MXFP4 matrix W [..., rows, cols] as `W_blocks` [..., rows, cols/32, 16] (uint8: two
4-bit E2M1 codes per byte, the low nibble first) and `W_scales` [..., rows, cols/32] (uint8: a shared E8M0
exponent per 32 values, biased by 127). transformers' GPT-OSS experts hold the transpose of that matrix
([E, d, 2f] for gate_up_proj), so the dequantized tensor is returned transposed in its last two dimensions.
"""

from __future__ import annotations

import torch

SUFFIXES = ("_blocks", "_scales")
# the sixteen E2M1 code points: sign, 2 exponent bits, 1 mantissa bit
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of an MXFP4 tensor, in transformers' (transposed) layout: [..., cols, rows]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not fit: uint8 [..., rows, groups, 16] and [..., rows, groups]")
    table = torch.tensor(E2M1, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., groups, 16, 2]: low nibble first
    values = table[codes].reshape(*blocks.shape[:-1], 32)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).transpose(-1, -2).contiguous()


def packed_names(names: set[str]) -> dict[str, tuple[str, str]]:
    """Each MXFP4 tensor's name → its (blocks, scales) names, among a checkpoint's tensor names."""
    return {n[: -len("_blocks")]: (n, n[: -len("_blocks")] + "_scales") for n in names
            if n.endswith("_blocks") and n[: -len("_blocks")] + "_scales" in names}
