"""The CUDA decode-attention kernel's logic, checked on the CPU with Triton's interpreter against
plain masked attention: dense causal caches, sparse tagged caches with sinks and a window,
padding queries, several splits, strided cache views."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import torch
    import triton.runtime.interpreter as interp

    # Triton 3.6's interpreter turns loop bounds into ints with int(array), which NumPy ≥ 2.4
    # refuses for 1-element arrays; take the element explicitly.
    _patch = interp._patch_lang_tensor

    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patched
    from magicdec.kernels.decode_attention import SPLIT, decode_attention

    def reference(q, k, v, qpos, kpos, window, n_kept):
        B, Hq, T, D = q.shape
        g = Hq // k.shape[1]
        kp = kpos if kpos is not None else torch.arange(k.shape[2]).expand(B, -1)
        slot = torch.arange(k.shape[2])
        qp = qpos.clamp(min=0)[..., None]
        vis = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp)
        if window:
            vis &= (slot < n_kept) | (kp[:, None, :] > qp - window)
        vis = torch.where((qpos >= 0)[..., None], vis, slot == 0)
        kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
        s = (q.double() @ kk.transpose(-1, -2)) / D ** 0.5
        s = s.masked_fill(~vis[:, None], float("-inf"))
        return (s.softmax(-1) @ vv).float()

    torch.manual_seed(0)
    B, Hkv, g, D, cap = 3, 2, 3, 16, SPLIT * 2 + 300
    buf_k, buf_v = torch.randn(2, B, Hkv, cap + 1, D), torch.randn(2, B, Hkv, cap + 1, D)
    k, v = buf_k[1, :, :, :cap], buf_v[1, :, :, :cap]          # strided views of a layered buffer
    for T in (1, 4):
        q = torch.randn(B, Hkv * g, T, D)
        # dense: rows of different lengths, one reaching into the third split; a padding query
        qpos = torch.tensor([[2100 + t for t in range(T)], [5 + t for t in range(T)], [900 + t for t in range(T)]])
        qpos[1, -1] = -1
        out = decode_attention(q, k, v, qpos)
        err = (out - reference(q, k, v, qpos, None, 0, 0)).abs().max().item()
        assert err < 1e-4, ("dense", T, err)
        # sparse: tags with holes, 4 kept slots, a window of 40, positions far beyond the slots
        kpos = torch.randint(0, 5000, (B, cap))
        kpos[:, :4] = torch.arange(4)
        kpos[:, 10:50] = -1
        qpos = torch.full((B, T), 4990) + torch.arange(T)
        out = decode_attention(q, k, v, qpos, kpos, window=40, n_kept=4)
        err = (out - reference(q, k, v, qpos, kpos, 40, 4)).abs().max().item()
        assert err < 1e-4, ("sparse", T, err)
    # a query alone gives the result it gets inside a larger block (same splits, same order)
    q = torch.randn(B, Hkv * g, 4, D)
    qpos = torch.tensor([[1500, 1501, 1502, 1503]] * B)
    block = decode_attention(q, k, v, qpos)
    alone = decode_attention(q[:, :, 2:3].contiguous(), k, v, qpos[:, 2:3])
    assert (block[:, :, 2:3] - alone).abs().max().item() < 1e-6
    print("ok")
''')


def test_decode_attention_kernel_in_the_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
