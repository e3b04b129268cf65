"""magicdec.kernels.cpu: accuracy against float64 references, bitwise batch/query invariance, strided
cache views, and the PyTorch fallback. The kernels are built once per session (not counted in the test
time); the kernel tests are skipped where they cannot be built, the fallback tests always run."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from magicdec.kernels import cpu

EPS32 = 2.0**-24  # unit roundoff of float32


@pytest.fixture(scope="session")
def kernels() -> None:
    try:
        cpu.build()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture
def threads() -> Iterator[None]:
    """Restores the thread count that a test changes."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("M,K,N", [(1, 576, 960), (8, 576, 100), (13, 37, 29), (64, 1536, 50), (3, 8, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float64(kernels: None, M: int, K: int, N: int, with_bias: bool) -> None:
    g = gen(M * 1000 + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if with_bias else None
    y = cpu.linear(x, w, b)
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
    # forward error bound of a K-term dot product (+ the bias add): ~K·u·Σ|x_k w_k|
    bound = (K + 2) * EPS32 * (x.double().abs() @ w.double().abs().T + (b.double().abs() if b is not None else 0))
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= bound).all()
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-6


def test_linear_is_batch_invariant(kernels: None, threads: None) -> None:
    g = gen(1)
    K, N = 576, 77
    x, w, b = torch.randn(37, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    full = cpu.linear(x, w, b)
    for m in range(x.shape[0]):  # each row alone
        assert torch.equal(cpu.linear(x[m : m + 1], w, b), full[m : m + 1])
    others = torch.randn(20, K, generator=g)  # the rows in another order, among other rows
    mixed = torch.cat([others[:7], x.flip(0), others[7:]])
    assert torch.equal(cpu.linear(mixed, w, b)[7 : 7 + 37].flip(0), full)
    torch.set_num_threads(1)
    assert torch.equal(cpu.linear(x, w, b), full)


def test_linear_strided_and_batched_inputs(kernels: None) -> None:
    g = gen(2)
    big = torch.randn(6, 3, 600, generator=g)
    x = big[..., 10:586]  # [6, 3, 576], rows strided by 600
    w = torch.randn(90, 700, generator=g)[:, :576]  # weight rows strided by 700
    y = cpu.linear(x, w)
    assert y.shape == (6, 3, 90)
    assert torch.equal(y, cpu.linear(x.contiguous(), w.contiguous()))
    assert torch.allclose(y, F.linear(x, w), rtol=1e-5, atol=1e-3)


def test_linear_rejects_mismatched_shapes(kernels: None) -> None:
    with pytest.raises(ValueError, match="features"):
        cpu.linear(torch.randn(2, 5), torch.randn(3, 4))


# ------------------------------------------------------------------------------------------- attention


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    kd, vd = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ vd


def random_problem(seed: int, B: int, Hq: int, Hkv: int, T: int, S: int, D: int, keep: float = 0.7,
                   capacity: int | None = None) -> tuple[torch.Tensor, ...]:
    """q, k, v, allowed with k and v strided views of [2, B, Hkv, capacity + 1, D] cache buffers (layer 1)
    and a causal mask with random holes (each row still sees its own slot)."""
    g = gen(seed)
    cap = capacity or S + 5
    kbuf, vbuf = torch.randn(2, B, Hkv, cap + 1, D, generator=g), torch.randn(2, B, Hkv, cap + 1, D, generator=g)
    q = torch.randn(B, Hq, T, D, generator=g) * 2  # peakier attention than unit-variance queries
    pos = torch.arange(S - T, S)
    allowed = (torch.arange(S) <= pos[:, None]) & (torch.rand(B, T, S, generator=g) < keep)
    allowed[:, torch.arange(T), pos] = True
    return q, kbuf[1, :, :, :S], vbuf[1, :, :, :S], allowed


@pytest.mark.parametrize(
    "B,Hq,Hkv,T,S,D,keep",
    [
        (2, 9, 3, 4, 1000, 64, 0.7),  # SmolLM2 heads, several chunks, holes
        (1, 8, 2, 1, 3000, 128, 0.3),  # D 128, few heads: S split over threads
        (3, 4, 4, 9, 70, 64, 1.0),  # no GQA, partial last block
        (2, 6, 3, 3, 300, 72, 0.05),  # D not a multiple of 16, very sparse
        (2, 3, 1, 16, 64, 8, 1.0),  # many rows, one block, D 8
    ],
)
def test_attention_matches_float64(kernels: None, B: int, Hq: int, Hkv: int, T: int, S: int, D: int,
                                   keep: float) -> None:
    q, k, v, allowed = random_problem(B * 100 + T, B, Hq, Hkv, T, S, D, keep)
    assert not k.is_contiguous()
    out = cpu.attention(q, k, v, allowed)
    ref = reference_attention(q, k, v, allowed)
    assert out.shape == (B, Hq, T, D) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_attention_single_allowed_key_returns_that_value(kernels: None) -> None:
    q, k, v, allowed = random_problem(3, 2, 9, 3, 4, 700, 64)
    only = torch.tensor([[0, 300, 699, 1], [5, 64, 255, 256]])  # a slot per (sequence, query)
    allowed = torch.zeros_like(allowed)
    allowed[torch.arange(2)[:, None], torch.arange(4), only] = True
    out = cpu.attention(q, k, v, allowed)
    for b in range(2):
        for t in range(4):
            expected = v[b, :, only[b, t]].repeat_interleave(3, 0)  # [Hq, D]
            assert torch.equal(out[b, :, t], expected)


def test_attention_rows_that_see_nothing_get_zeros(kernels: None) -> None:
    q, k, v, allowed = random_problem(4, 1, 2, 1, 2, 100, 64)
    allowed[0, 1] = False
    out = cpu.attention(q, k, v, allowed)
    assert torch.equal(out[0, :, 1], torch.zeros(2, 64))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("S", [1000, 5000])  # one thread per KV head / S split over threads for B = 1
def test_attention_is_query_and_batch_invariant(kernels: None, threads: None, S: int) -> None:
    B, Hq, Hkv, T, D = 3, 9, 3, 4, 64
    q, k, v, allowed = random_problem(5, B, Hq, Hkv, T, S, D, keep=0.8)
    full = cpu.attention(q, k, v, allowed)
    for b in range(B):
        for t in range(T):
            # the query alone, as in plain decoding: T = 1 and the cache only as long as its position
            last = int(allowed[b, t].nonzero().max()) + 1
            alone = cpu.attention(q[b : b + 1, :, t : t + 1], k[b : b + 1, :, :last], v[b : b + 1, :, :last],
                                  allowed[b : b + 1, t : t + 1, :last])
            assert torch.equal(alone[0, :, 0], full[b, :, t]), (b, t)
    # the sequences in another order, among other sequences (other B, so another thread split)
    q2, k2, v2, allowed2 = random_problem(6, 5, Hq, Hkv, T, S, D)
    order = [2, 0, 1]
    mixed = [torch.cat([x2[:1], x[order], x2[1:]]) for x, x2 in ((q, q2), (k, k2), (v, v2), (allowed, allowed2))]
    assert torch.equal(cpu.attention(*mixed)[1:4], full[order])
    # queries in another order within the block, and another thread count
    perm = [3, 1, 0, 2]
    torch.set_num_threads(1)
    assert torch.equal(cpu.attention(q[:, :, perm], k, v, allowed[:, perm]), full[:, :, perm])


def test_attention_general_strides(kernels: None) -> None:
    """K/V laid out [B, S, H, D] (S stride H·D), q and the mask non-contiguous too."""
    g = gen(7)
    B, Hq, Hkv, T, S, D = 2, 6, 2, 3, 400, 64
    k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
    allowed = (torch.rand(B, S, T, generator=g) < 0.5).transpose(1, 2)
    allowed[..., 0] = True
    out = cpu.attention(q, k, v, allowed)
    assert torch.equal(out, cpu.attention(q.contiguous(), k.contiguous(), v.contiguous(), allowed.contiguous()))
    assert (out.double() - reference_attention(q, k, v, allowed)).abs().max() < 1e-5


def test_attention_rejects_bad_shapes(kernels: None) -> None:
    q, k, v, allowed = random_problem(8, 1, 4, 2, 2, 50, 64)
    with pytest.raises(ValueError, match="want q"):
        cpu.attention(q[0], k, v, allowed)
    with pytest.raises(RuntimeError, match="allowed must be"):
        cpu.attention(q, k, v, allowed[:, :, :10])
    with pytest.raises(RuntimeError, match="not a multiple"):
        cpu.attention(q[:, :3], k, v, allowed)
    with pytest.raises(ValueError, match="bool"):
        cpu.attention(q, k, v, allowed.float())


# -------------------------------------------------------------------------------------------- fallback


def test_switched_off_falls_back_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    assert not cpu.available()
    assert "switched off" in (cpu.unavailable_reason() or "")
    assert not cpu.applies(torch.ones(1), tokens=1)
    g = gen(9)
    x, w, b = torch.randn(2, 3, 40, generator=g), torch.randn(7, 40, generator=g), torch.randn(7, generator=g)
    assert torch.equal(cpu.linear(x, w, b), F.linear(x, w, b))
    q, k, v, allowed = random_problem(10, 2, 6, 3, 2, 90, 64)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)
    assert torch.equal(cpu.attention(q, k, v, allowed), expected)


def test_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(verbose: bool) -> None:
        raise OSError("no c++ compiler")

    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    monkeypatch.setattr(cpu, "_compile", no_compiler)
    monkeypatch.setattr(cpu, "_state", {"module": None, "tried": False, "reason": None, "build_s": None})
    x, w = torch.randn(3, 16), torch.randn(5, 16)
    with pytest.warns(RuntimeWarning, match="no c.. compiler"):
        y = cpu.linear(x, w)
    assert torch.equal(y, F.linear(x, w))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not cpu.available()
        assert torch.equal(cpu.linear(x, w), y)
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu.build()


def test_unsupported_tensors_fall_back(kernels: None) -> None:
    x, w = torch.randn(3, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(cpu.linear(x, w), F.linear(x, w))
    assert not cpu.applies(x, tokens=1)
    assert not cpu.applies(torch.ones(2), tokens=cpu.MAX_DECODE_TOKENS + 1)
    assert cpu.applies(torch.ones(2), tokens=cpu.MAX_DECODE_TOKENS)
