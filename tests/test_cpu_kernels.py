"""magicdec.kernels.cpu: accuracy against float64 references, bitwise batch/query invariance (of the kernels,
and of a model's logits in float32, bfloat16 and float16), strided cache views, paged attention (bitwise the
dense attention on the gathered cache), the PyTorch fallback, and the
build: stale and live build locks, the compile message, ensure_built. The kernels are built once per session
(not counted in the test time); the kernel tests are skipped where they cannot be built, the fallback tests
always run."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from magicdec.home.paths import ENV_HOME
from magicdec.kernels import cpu

EPS32 = 2.0**-24  # unit roundoff of float32




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
                   capacity: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """q, k, v, allowed with k and v strided views of [2, B, Hkv, capacity + 1, D] cache buffers (layer 1)
    and a causal mask with random holes (each row still sees its own slot)."""
    g = gen(seed)
    cap = capacity or S + 5
    kbuf, vbuf = (torch.randn(2, B, Hkv, cap + 1, D, generator=g).to(dtype) for _ in range(2))
    q = (torch.randn(B, Hq, T, D, generator=g) * 2).to(dtype)  # peakier attention than unit-variance queries
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80])  # a head dim compiled as a constant, one taken at run time
def test_16bit_inputs_give_the_float32_result_rounded(kernels: None, dtype: torch.dtype, D: int) -> None:
    """16-bit weights, keys and values are widened exactly and all arithmetic is float32, so the result is
    the float32 kernel's on the same values, rounded once to the inputs' dtype (hence batch-invariant)."""
    g = gen(12)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((5, 3, 37), (29, 37), (29,)))
    y = cpu.linear(x, w, b)  # K = 37: a tail of 5
    assert y.dtype == dtype and torch.equal(y, cpu.linear(x.float(), w.float(), b.float()).to(dtype))
    q, k, v, allowed = random_problem(13, 2, 9, 3, 4, 600, D, dtype=dtype)
    assert not k.is_contiguous()
    out = cpu.attention(q, k, v, allowed)
    assert out.dtype == dtype and torch.equal(out, cpu.attention(q.float(), k.float(), v.float(), allowed).to(dtype))
    assert (out.double() - reference_attention(q, k, v, allowed)).abs().max() < 2e-2


# ------------------------------------------------------------------------------------- paged attention


def paged_problem(seed: int, B: int, Hq: int, Hkv: int, T: int, lengths: list[int], P: int, D: int,
                  shared: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """q, k_pool, v_pool, table (int32), allowed of a paged cache: row b holds lengths[b] slots, its T
    queries at the last T positions with a causal mask; the pools are strided views (layer 1, the first D
    of D + 8 columns) of [2, N, Hkv, P, D + 8] buffers, pages are used in shuffled order, the first
    `shared` pages of row 0 are also the first pages of every other row (a shared prefix), and unused table
    entries hold page 0."""
    g = gen(seed)
    need = [-(-n // P) for n in lengths]
    nb = max(need)
    assert all(shared <= n for n in need)
    N = need[0] + sum(n - shared for n in need[1:]) + 3  # a few pages nobody uses
    fresh = iter(torch.randperm(N, generator=g).tolist())
    table = torch.zeros(B, nb, dtype=torch.int32)
    for b in range(B):
        for i in range(need[b]):
            table[b, i] = table[0, i] if b > 0 and i < shared else next(fresh)
    kbuf, vbuf = (torch.randn(2, N, Hkv, P, D + 8, generator=g).to(dtype) for _ in range(2))
    q = (torch.randn(B, Hq, T, D, generator=g) * 2).to(dtype)
    pos = torch.tensor(lengths)[:, None] - T + torch.arange(T)  # [B, T]
    allowed = torch.arange(nb * P) <= pos[..., None]
    return q, kbuf[1, ..., :D], vbuf[1, ..., :D], table, allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 9])
@pytest.mark.parametrize("Hq,Hkv,D", [(6, 2, 64), (9, 3, 64), (6, 2, 72)])  # B·Hkv = 6: S split over threads
@pytest.mark.parametrize("P", [64, 128, 192])  # 192: pages that straddle the 256-slot chunks
def test_paged_attention_is_bitwise_the_dense_attention(kernels: None, threads: None, dtype: torch.dtype, T: int,
                                                        Hq: int, Hkv: int, D: int, P: int) -> None:
    """Pages in shuffled order, a prefix shared between rows, rows of different lengths (up to 600 slots:
    three chunks): the result is bitwise `attention` on the gathered dense cache, and each row alone with
    only its own pages gives the same bits (T, B and S invariance carry over)."""
    lengths = [600, 317, 130]
    q, kp, vp, table, allowed = paged_problem(T * 10 + P, 3, Hq, Hkv, T, lengths, P, D, dtype=dtype)
    assert not kp.is_contiguous() and kp.stride(-1) == 1
    out = cpu.paged_attention(q, kp, vp, table, allowed)
    K, V = cpu.gather_pages(kp, table), cpu.gather_pages(vp, table)
    assert out.shape == (3, Hq, T, D) and out.dtype == dtype
    assert torch.equal(out, cpu.attention(q, K, V, allowed))
    assert torch.equal(cpu.paged_attention(q, kp, vp, table.long(), allowed), out)
    assert (out.double() - reference_attention(q, K, V, allowed)).abs().max() < (1e-5 if dtype == torch.float32
                                                                                   else 2e-2)
    for b, n in enumerate(lengths):
        pages = -(-n // P)
        alone = cpu.paged_attention(q[b : b + 1], kp, vp, table[b : b + 1, :pages], allowed[b : b + 1, :, : pages * P])
        assert torch.equal(alone, out[b : b + 1]), b
    torch.set_num_threads(1)  # the other thread split (none)
    assert torch.equal(cpu.paged_attention(q, kp, vp, table, allowed), out)


def test_paged_attention_long_rows_match_dense_cache(kernels: None) -> None:
    """B 2, Hq 9 / Hkv 3, T 4, D 128, 2000 slots in 256-slot pages, float16: the same bits as a dense
    cache holding the same values in slot order (not a gather of the pool)."""
    B, Hq, Hkv, T, S, D, P = 2, 9, 3, 4, 2000, 128, 256
    q, k, v, allowed = random_problem(21, B, Hq, Hkv, T, S, D, dtype=torch.float16)
    nb = -(-S // P)
    order = torch.randperm(B * nb + 1, generator=gen(22))  # pool page order[b·nb + i] holds block i of row b
    table = order[: B * nb].view(B, nb)
    pools = []
    for x in (k, v):
        pool = torch.zeros(B * nb + 1, Hkv, P, D, dtype=x.dtype)
        padded = F.pad(x, (0, 0, 0, nb * P - S))  # [B, Hkv, nb·P, D]
        pool[table.flatten()] = padded.view(B, Hkv, nb, P, D).transpose(1, 2).reshape(B * nb, Hkv, P, D)
        pools.append(pool)
    allowed_p = F.pad(allowed, (0, nb * P - S))
    out = cpu.paged_attention(q, pools[0], pools[1], table, allowed_p)
    assert torch.equal(out, cpu.attention(q, k, v, allowed))


@pytest.mark.parametrize("P", [16, 96, 0])
def test_paged_attention_refuses_page_sizes_off_the_block(P: int) -> None:
    q = torch.randn(1, 2, 1, 64)
    pool = torch.randn(4, 1, P, 64)
    with pytest.raises(ValueError, match=rf"page size \(P = {P} slots.*multiple of 64"):
        cpu.paged_attention(q, pool, pool, torch.zeros(1, 2, dtype=torch.int32),
                            torch.ones(1, 1, 2 * P, dtype=torch.bool))


def test_paged_attention_rejects_bad_arguments(kernels: None) -> None:
    q, kp, vp, table, allowed = paged_problem(23, 2, 4, 2, 2, [200, 100], 64, 64)
    with pytest.raises(ValueError, match="want q"):
        cpu.paged_attention(q, kp, vp, table[0], allowed)
    with pytest.raises(ValueError, match="bool"):
        cpu.paged_attention(q, kp, vp, table, allowed.float())
    with pytest.raises(ValueError, match="int32 or int64"):
        cpu.paged_attention(q, kp, vp, table.float(), allowed)
    with pytest.raises(ValueError, match="allowed"):
        cpu.paged_attention(q, kp, vp, table, allowed[..., :-1])
    with pytest.raises(ValueError, match="does not fit"):
        cpu.paged_attention(q[:, :3], kp, vp, table, allowed)
    with pytest.raises(RuntimeError, match="page id 99"):  # checked before the kernel reads anything
        cpu.paged_attention(q, kp, vp, torch.full_like(table, 99), allowed)
    module = cpu._state["module"]
    with pytest.raises(RuntimeError, match=r"page size \(P = 16"):  # the bindings check too
        module.paged_attention(q, kp[:, :, :16], vp[:, :, :16], table, allowed[..., : 16 * table.shape[1]])


def test_paged_attention_fallback_agrees_with_the_kernel(kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the kernels (switched off; or float64 tensors) the pages are gathered and SDPA runs: the
    same result to float32 rounding."""
    q, kp, vp, table, allowed = paged_problem(24, 3, 6, 2, 5, [600, 317, 130], 128, 64, shared=2)
    kernel = cpu.paged_attention(q, kp, vp, table, allowed)
    K, V = cpu.gather_pages(kp, table), cpu.gather_pages(vp, table)
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    assert not cpu.available()
    fallback = cpu.paged_attention(q, kp, vp, table, allowed)
    assert torch.equal(fallback, F.scaled_dot_product_attention(q, K, V, attn_mask=allowed[:, None], enable_gqa=True))
    assert (fallback - kernel).abs().max() / kernel.abs().max() < 1e-5
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    out64 = cpu.paged_attention(q.double(), kp.double(), vp.double(), table, allowed)
    assert out64.dtype == torch.float64 and (out64 - kernel.double()).abs().max() / kernel.abs().max() < 1e-5
    with pytest.raises(ValueError, match="outside"):
        cpu.paged_attention(q.double(), kp.double(), vp.double(), table + 1000, allowed)


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


# --------------------------------------------------------------------------------------- model forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_logits_do_not_depend_on_tokens_per_forward(kernels: None, dtype: torch.dtype) -> None:
    """A token's logits are bitwise the same computed alone (T = 1, plain decoding) or inside a block of
    T = 4 (verification), in every dtype the CPU path takes."""
    from conftest import PagedRows
    from magicdec.config import ModelConfig
    from magicdec.loading.random_init import random_model

    cfg = ModelConfig(vocab_size=200, hidden_size=256, intermediate_size=344, n_layers=2, n_heads=4,
                      n_kv_heads=2, name="t")  # head_dim 64, GQA
    model = random_model(cfg, "cpu", dtype, seed=0)
    B, P, T = 2, 300, 4
    ids = torch.randint(0, cfg.vocab_size, (B, P + T), generator=gen(11))
    pos = torch.arange(P + T).expand(B, -1)

    def prefilled() -> PagedRows:
        rows = PagedRows(model, B, P + T + 8)
        rows(ids[:, :P], pos[:, :P])  # a prefill chunk (T > 16: the stock ops)
        return rows

    rows = prefilled()
    block = rows(ids[:, P:], pos[:, P:])
    rows = prefilled()
    alone = torch.cat([rows(ids[:, P + t : P + t + 1], pos[:, P + t : P + t + 1]) for t in range(T)], 1)
    assert block.dtype == dtype
    assert torch.equal(block, alone), (block.float() - alone.float()).abs().max()


# ------------------------------------------------------------------------------------ build and locks

# A build in progress: it holds the build lock and (when compiling) torch's lock file until a line arrives on
# its stdin (60 s at most). Killed, it is a build interrupted midway (its terminal closed): it leaves torch's
# lock file behind.
BUILDER = """
import fcntl, os, select, sys
fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
if sys.argv[3] == "1":
    os.close(os.open(os.path.join(sys.argv[1], "lock"), os.O_CREAT | os.O_EXCL))
print("building", flush=True)
select.select([sys.stdin], [], [], 60)
"""
BUILD = [sys.executable, "-m", "magicdec.kernels.cpu", "build"]  # what a later run does first


def cached_build_in(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of this session's finished build under a new MAGICDEC_HOME (nothing left to compile)."""
    built = cpu.build_dir()
    monkeypatch.setenv(ENV_HOME, str(home))
    directory = cpu.build_dir()
    shutil.copytree(built, directory)
    return directory


def start_builder(directory: Path, torch_lock: bool) -> subprocess.Popen[str]:
    args = [str(directory), cpu.BUILD_LOCK, str(int(torch_lock))]
    builder = subprocess.Popen([sys.executable, "-c", BUILDER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    assert builder.stdout is not None and builder.stdout.readline().strip() == "building"
    return builder


def test_stale_lock_of_a_killed_build_is_taken_over(kernels: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    directory = cached_build_in(tmp_path, monkeypatch)
    builder = start_builder(directory, torch_lock=True)
    builder.kill()
    builder.wait()
    assert (directory / "lock").exists()
    start = time.perf_counter()
    proc = subprocess.run(BUILD, capture_output=True, text=True, timeout=90)  # before the fix: waited forever
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "removed a stale build lock" in proc.stderr and "compiling" not in proc.stderr
    assert not (directory / "lock").exists()
    assert seconds < 30


def test_live_build_is_waited_for_with_a_message(kernels: None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A build in progress (its lock held by a live process) is waited for, not taken over."""
    directory = cached_build_in(tmp_path, monkeypatch)
    builder = start_builder(directory, torch_lock=False)
    build = subprocess.Popen(BUILD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert build.stderr is not None
    waiting = ""
    while "waiting" not in waiting and (line := build.stderr.readline()):
        waiting = line
    assert build.poll() is None  # still waiting
    builder.communicate("done\n", timeout=10)  # the other build finishes
    out, err = build.communicate(timeout=60)
    assert build.returncode == 0, err
    assert "waiting for another process that is building" in waiting and "stale" not in err
    assert "ready" in out


def test_compiling_is_announced_and_ensure_built_is_cheap_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The first build says on stderr that it compiles and how long it took; a cached build says nothing;
    ensure_built() builds once and then returns at once."""
    import torch.utils.cpp_extension

    loads = []

    def fake_load(**kwargs: object) -> SimpleNamespace:  # stands in for the compiler: writes the .so
        loads.append(kwargs)
        Path(str(kwargs["build_directory"]), f"{kwargs['name']}.so").touch()
        return SimpleNamespace(cpu_supported=lambda: True)

    monkeypatch.setenv(ENV_HOME, str(tmp_path))
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpu, "_state", {"module": None, "tried": False, "reason": None, "build_s": None})
    monkeypatch.setattr(cpu, "_cpu_reason", lambda: None)
    assert not cpu.ensure_built("meta") and not loads  # not for other devices
    assert cpu.ensure_built()
    err = capsys.readouterr().err
    assert "compiling the CPU kernels (once)" in err and "compiled the CPU kernels in" in err
    start = time.perf_counter()
    assert all(cpu.ensure_built(torch.device("cpu")) for _ in range(1000))
    assert time.perf_counter() - start < 0.1 and len(loads) == 1  # no second build or load, no lock
    monkeypatch.setattr(cpu, "_state", {"module": None, "tried": False, "reason": None, "build_s": None})
    assert cpu.ensure_built() and len(loads) == 2  # a later process: loads the cached build silently
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------ int8 linear


def int8_problem(seed: int, M: int, K: int, N: int, with_bias: bool) -> tuple[torch.Tensor, ...]:
    """x [M, K], weight_q [N, K] int8 (the full range, -127..127), scales [N] (~1/127 of a row's max),
    bias [N] or None."""
    g = gen(seed)
    x = torch.randn(M, K, generator=g)
    wq = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scales = torch.rand(N, generator=g) * 0.01 + 1e-3
    b = torch.randn(N, generator=g) if with_bias else None
    return x, wq, scales, b


def int8_reference(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """float64 (x · wqᵀ) * scales + b."""
    y = (x.double() @ wq.double().T) * scales.double()
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("M", [1, 3, 9])
@pytest.mark.parametrize("K,N", [(576, 100), (37, 29), (1536, 7), (5, 1)])  # K 37 and 5: masked tails
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_int8_matches_float64(kernels: None, M: int, K: int, N: int, with_bias: bool) -> None:
    x, wq, scales, b = int8_problem(M * 1000 + K, M, K, N, with_bias)
    y = cpu.linear_int8(x, wq, scales, b)
    ref = int8_reference(x, wq, scales, b)
    assert y.shape == (M, N) and y.dtype == torch.float32
    # a K-term dot product of float32 x and exact integers, then a scale and a bias: ~K·u·Σ|x_k q_k|·s
    bound = (K + 3) * EPS32 * ((x.double().abs() @ wq.double().abs().T) * scales.double()
                               + (b.double().abs() if b is not None else 0))
    assert ((y.double() - ref).abs() <= bound).all()
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-6
    # the dequantized float32 weight (what the fallback multiplies by) gives the same to ~1e-6
    deq = F.linear(x, cpu.dequantize_int8(wq, scales), b)
    assert (y - deq).abs().max() / deq.abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_int8_16bit_inputs_give_the_float32_result_rounded(kernels: None, dtype: torch.dtype) -> None:
    x, wq, scales, b = int8_problem(5, 9, 101, 40, with_bias=True)
    x, b = x.to(dtype), b.to(dtype)
    y = cpu.linear_int8(x, wq, scales, b)
    assert y.dtype == dtype and y.shape == (9, 40)
    assert torch.equal(y, cpu.linear_int8(x.float(), wq, scales, b.float()).to(dtype))
    ref = int8_reference(x, wq, scales, b)
    assert (y.double() - ref).abs().max() / ref.abs().max() < 2.0 ** -7  # one rounding to 16 bits


def test_linear_int8_is_batch_invariant(kernels: None, threads: None) -> None:
    x, wq, scales, b = int8_problem(6, 37, 576, 77, with_bias=True)
    full = cpu.linear_int8(x, wq, scales, b)
    for m in range(x.shape[0]):
        assert torch.equal(cpu.linear_int8(x[m : m + 1], wq, scales, b), full[m : m + 1])
    others = torch.randn(20, 576, generator=gen(7))
    mixed = torch.cat([others[:7], x.flip(0), others[7:]])
    assert torch.equal(cpu.linear_int8(mixed, wq, scales, b)[7 : 7 + 37].flip(0), full)
    torch.set_num_threads(1)
    assert torch.equal(cpu.linear_int8(x, wq, scales, b), full)


def test_linear_int8_strided_and_batched_inputs(kernels: None) -> None:
    g = gen(8)
    x = torch.randn(4, 3, 600, generator=g)[..., 10:586]  # [4, 3, 576], rows strided by 600
    wq = torch.randint(-127, 128, (90, 700), generator=g, dtype=torch.int8)[:, :576]  # rows strided by 700
    scales = torch.rand(90, generator=g) + 0.5
    y = cpu.linear_int8(x, wq, scales)
    assert y.shape == (4, 3, 90)
    assert torch.equal(y, cpu.linear_int8(x.contiguous(), wq.contiguous(), scales))
    assert torch.equal(y[1:2, 2:3], cpu.linear_int8(x[1:2, 2:3], wq, scales))
    assert cpu.linear_int8(x[:0], wq, scales).shape == (0, 3, 90)


def test_linear_int8_rejects_bad_arguments(kernels: None) -> None:
    x, wq, scales, b = int8_problem(9, 2, 16, 5, with_bias=True)
    with pytest.raises(ValueError, match="features"):
        cpu.linear_int8(torch.randn(2, 15), wq, scales)
    with pytest.raises(ValueError, match="weight_q must be int8"):
        cpu.linear_int8(x, wq.float(), scales)
    with pytest.raises(ValueError, match=r"weight_q must be \[N, K\]"):
        cpu.linear_int8(x, wq[None], scales)
    with pytest.raises(ValueError, match=r"scales must be float32 \[5\]"):
        cpu.linear_int8(x, wq, scales[:4])
    with pytest.raises(ValueError, match=r"scales must be float32 \[5\]"):
        cpu.linear_int8(x, wq, scales.double())
    with pytest.raises(ValueError, match=r"bias must be a floating-point \[5\]"):
        cpu.linear_int8(x, wq, scales, b[:3])
    with pytest.raises(ValueError, match="x must be a floating-point"):
        cpu.linear_int8(x.long(), wq, scales)


def test_linear_int8_fallback_agrees_with_the_kernel(kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched off (or for float64 x) linear_int8 runs F.linear on the weight dequantized for the call."""
    x, wq, scales, b = int8_problem(10, 3, 45, 33, with_bias=True)
    kernel = cpu.linear_int8(x, wq, scales, b)
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    assert not cpu.available()
    fallback = cpu.linear_int8(x, wq, scales, b)
    assert torch.equal(fallback, F.linear(x, (wq.float() * scales[:, None]), b))
    assert (fallback - kernel).abs().max() / kernel.abs().max() < 1e-5
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    y64 = cpu.linear_int8(x.double(), wq, scales, b)
    assert y64.dtype == torch.float64 and (y64 - kernel.double()).abs().max() / kernel.abs().max() < 1e-5
    xg = x.clone().requires_grad_()  # autograd: the differentiable fallback
    cpu.linear_int8(xg, wq, scales, b).sum().backward()
    assert torch.allclose(xg.grad, cpu.dequantize_int8(wq, scales).sum(0).expand_as(x))
