"""The linear layer every projection of the decoder uses (dense, attention, experts, router, head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from magicdec.kernels import cpu as cpu_kernels
from magicdec.kernels.cpu import MAX_DECODE_TOKENS


class Linear(nn.Linear):
    """nn.Linear; decode-shaped forwards on the CPU (≤ MAX_DECODE_TOKENS tokens per sequence, float32/bf16/fp16) use the
    batch-invariant kernel of `magicdec.kernels.cpu`, so a token's logits do not depend on how many tokens
    share its forward (verification and plain decoding agree bit for bit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and cpu_kernels.applies(x, x.shape[1], max_tokens=MAX_DECODE_TOKENS):
            return cpu_kernels.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
