"""The CUDA decode-attention kernel's logic, checked on the CPU with Triton's interpreter against
plain masked attention: dense causal caches, sparse tagged caches with sinks and a window,
padding queries, several splits, strided cache views; head dims that are powers of two and ones that
are not (80, 96: the kernels pad them to a power-of-two block)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import triton.runtime.interpreter as interp

    # Triton 3.6's interpreter turns loop bounds into ints with int(array), which NumPy ≥ 2.4
    # refuses for 1-element arrays; take the element explicitly.
    _patch = interp._patch_lang_tensor

    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patched
    from magicdec.kernels.decode_attention import MIN_SPLIT, decode_attention

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
    D = int(sys.argv[1])  # the head dim under test
    B, Hkv, g, cap = 3, 2, 3, MIN_SPLIT * 4 + 300
    buf_k, buf_v = torch.randn(2, B, Hkv, cap + 1, D), torch.randn(2, B, Hkv, cap + 1, D)
    k, v = buf_k[1, :, :, :cap], buf_v[1, :, :, :cap]          # strided views of a layered buffer
    for T in (1, 4):
        q = torch.randn(B, Hkv * g, T, D)
        # dense: rows of different lengths, one reaching into the third split; a padding query
        qpos = torch.tensor([[2200 + t for t in range(T)], [5 + t for t in range(T)], [900 + t for t in range(T)]])
        qpos[1, -1] = -1
        out = decode_attention(q, k, v, qpos.int())
        err = (out - reference(q, k, v, qpos, None, 0, 0)).abs().max().item()
        assert err < 1e-4, ("dense", T, err)
        # sparse: tags with holes, 4 kept slots, a window of 40, positions far beyond the slots
        kpos = torch.randint(0, 5000, (B, cap))
        kpos[:, :4] = torch.arange(4)
        kpos[:, 10:50] = -1
        qpos = torch.full((B, T), 4990) + torch.arange(T)
        out = decode_attention(q, k, v, qpos.int(), kpos.int(), window=40, n_kept=4)
        err = (out - reference(q, k, v, qpos, kpos, 40, 4)).abs().max().item()
        assert err < 1e-4, ("sparse", T, err)
    # a query alone gives the result it gets inside a larger block (same splits, same order)
    q = torch.randn(B, Hkv * g, 4, D)
    qpos = torch.tensor([[1500, 1501, 1502, 1503]] * B)
    block = decode_attention(q, k, v, qpos.int())
    alone = decode_attention(q[:, :, 2:3], k, v, qpos[:, 2:3].int())  # a strided query
    assert (block[:, :, 2:3] - alone).abs().max().item() < 1e-6

    # the fused elementwise kernels against the eager ops
    from magicdec.kernels import fused
    from magicdec.model.rope import apply_rope
    x, w = torch.randn(5, 7, 96), torch.randn(96)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert (fused.rms_norm(x, w, 1e-5) - ref).abs().max() < 1e-5
    gu = torch.randn(3, 4, 2 * 80)
    assert (fused.silu_mul(gu) - torch.nn.functional.silu(gu[..., :80]) * gu[..., 80:]).abs().max() < 1e-5
    B, T, hq, hkv = 2, 3, 4, 2
    qkv = torch.randn(B, T, (hq + 2 * hkv) * D)
    ang = torch.randn(B, 1, T, D // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    heads = qkv.view(B, T, hq + 2 * hkv, D).transpose(1, 2)
    want = torch.cat([apply_rope(heads[:, : hq + hkv], cos, sin), heads[:, hq + hkv :]], 1)
    fused.rope_(qkv, cos, sin, hq + hkv, D)
    assert (qkv.view(B, T, hq + 2 * hkv, D).transpose(1, 2) - want).abs().max() < 1e-5
    print("ok")
''')

MODEL_SCRIPT = SCRIPT.split("torch.manual_seed(0)")[0] + textwrap.dedent('''
    import os
    from magicdec.cache.paged import PagedKVCache, PagedView
    from magicdec.config import ModelConfig
    from magicdec.loading.random_init import random_model

    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=int(sys.argv[1]), name="t")
    model = random_model(cfg, "cpu", torch.float32, seed=0)
    ids = torch.randint(0, 96, (2, 40))
    pos = torch.arange(40).expand(2, -1)

    def run():
        pool = PagedKVCache.for_model(model, 4, 64)
        cache = PagedView(pool, torch.tensor([[2, 0], [1, 3]]))  # two rows, each its own blocks
        with torch.inference_mode():
            a = model(ids[:, :30], pos[:, :30], cache)  # a prefill chunk (SDPA)
            b = model(ids[:, 30:31], pos[:, 30:31], cache)  # a decode step
            c = model(ids[:, 31:35], pos[:, 31:35], cache)  # a verification block
        return torch.cat([a, b, c], 1)

    eager = run()
    os.environ["MAGICDEC_TRITON_ON_CPU"] = "1"
    triton_path = run()
    assert (triton_path - eager).abs().max() < 1e-4, (triton_path - eager).abs().max()
    print("ok")
''')


def interpret(script: str, head_dim: int) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(head_dim)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("head_dim", [16, 64, 80, 96])
def test_decode_attention_and_fused_kernels_in_the_triton_interpreter(head_dim: int) -> None:
    interpret(SCRIPT, head_dim)


@pytest.mark.parametrize("head_dim", [16, 80])
def test_model_forward_through_the_triton_kernels_equals_eager(head_dim: int) -> None:
    interpret(MODEL_SCRIPT, head_dim)
