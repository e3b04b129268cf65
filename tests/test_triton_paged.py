"""The CUDA paged split-KV attention kernel's logic, checked on the CPU with Triton's interpreter against
float64 masked attention on the gathered keys: pools with shuffled page ids (strided views of a layered
pool), rows of different lengths, padding queries, T = 1 and 4, GQA, several splits and a single one,
a sparse draft's view (a read table of a few pages, slots tagged with positions and holes, a window and
sinks), head dims 64 and 80; block scores against `cpu.block_scores_reference` (max-accumulated into a
buffer that already holds values). Then `PagedStep.attend` through the Triton path (MAGICDEC_TRITON_ON_CPU=1)
against its CPU path, with block scores: the target's view, a sparse view and a per-layer sparse view (each
layer its own read table, per-layer scores)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from test_triton_attention import SCRIPT as DENSE_SCRIPT  # noqa: E402
from test_triton_attention import interpret  # noqa: E402

PREAMBLE = DENSE_SCRIPT.split("from magicdec.kernels.decode_attention")[0]  # imports and the interpreter patch

SCRIPT = PREAMBLE + '''
from magicdec.kernels.cpu import block_scores_reference, gather_pages
from magicdec.kernels.paged_attention import paged_attention
from magicdec.model.attention import AttentionMask

def reference(q, k_pool, v_pool, table, qpos, kpos, window, n_kept):
    """float64 attention over the gathered pages, and the visibility it used [B, T, nb·P]."""
    B, Hq, T, D = q.shape
    k, v = gather_pages(k_pool, table), gather_pages(v_pool, table)
    g = Hq // k.shape[1]
    allowed = AttentionMask(g, q.dtype, qpos, k.shape[2], key_pos=kpos, window=window, n_kept=n_kept).allowed
    kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = (q.double() @ kk.transpose(-1, -2)) / D ** 0.5
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return (s.softmax(-1) @ vv).float(), k, allowed

def check(name, q, k_pool, v_pool, table, qpos, kpos=None, window=0, n_kept=0):
    ref, k, allowed = reference(q, k_pool, v_pool, table, qpos, kpos, window, n_kept)
    start = torch.rand(table.shape) * 0.05  # scores already there: max-accumulated
    scores = start.clone()
    out = paged_attention(q, k_pool, v_pool, table, qpos.int(), None if kpos is None else kpos.int(), window,
                          n_kept, block_scores=scores)
    err = (out - ref).abs().max().item()
    assert err < 1e-4, (name, err)
    want = block_scores_reference(q, k, allowed, k_pool.shape[2], start.clone())
    serr = (scores - want).abs().max().item()
    assert serr < 1e-5, (name, "scores", serr)
    assert (want > start).any(), name  # the scores took part
    plain = paged_attention(q, k_pool, v_pool, table, qpos.int(), None if kpos is None else kpos.int(), window,
                            n_kept)
    assert (plain - out).abs().max().item() == 0, name  # scores do not change the output

torch.manual_seed(0)
D = int(sys.argv[1])
B, Hkv, g, P, N = 3, 2, 3, 64, 40
pool_k, pool_v = torch.randn(2, N + 1, Hkv, P, D), torch.randn(2, N + 1, Hkv, P, D)
k_pool, v_pool = pool_k[1], pool_v[1]  # strided views of a layered pool, as PagedKVCache hands over
perm = torch.randperm(N)
for T in (1, 4):
    q = torch.randn(B, Hkv * g, T, D)
    # the target: 20 columns (1280 slots, 3 splits), rows of 1270+, 6 and 700 tokens; columns a row does not
    # reach hold other (valid) pages; a padding query
    table = torch.stack([perm[:20], perm[20:40], perm.roll(7)[:20]])
    qpos = torch.tensor([[1260 + t for t in range(T)], [5 + t for t in range(T)], [700 + t for t in range(T)]])
    qpos[1, -1] = -1
    check(("target", T), q, k_pool, v_pool, table, qpos)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided queries
    check(("target strided q", T), qt, k_pool, v_pool, table, qpos)
    # a sparse draft: the sinks' page and the last pages of the window, slots tagged with positions
    for nr in (3, 10):  # one split, two splits
        read = torch.stack([perm[torch.randperm(N)[:nr]] for _ in range(B)])
        blocks = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.arange(30 - nr + 1, 30).expand(B, -1)], 1)
        read_pos = (blocks[..., None] * P + torch.arange(P)).reshape(B, nr * P)
        read_pos[:, P + 5 : P + 9] = -1  # holes
        last = 30 * P - 20 + torch.tensor([0, -3, -40])  # each row's first query; slots past it unwritten
        read_pos = torch.where(read_pos > last[:, None] + T, -1, read_pos)
        qpos = last[:, None] + torch.arange(T)
        if T > 1:
            qpos[2, -1] = -1
        check(("sparse", nr, T), q, k_pool, v_pool, read, qpos, read_pos, window=150, n_kept=4)
# pages of 128 slots (two key blocks per page), an int32 table
k2, v2 = torch.randn(12, Hkv, 2 * P, D), torch.randn(12, Hkv, 2 * P, D)
table = torch.stack([torch.randperm(12)[:6] for _ in range(B)]).int()
qpos = torch.tensor([[700, 701, 702, 703], [130, 131, -1, -1], [3, 4, 5, 6]])
check("pages of 128", q, k2, v2, table, qpos)

# PagedStep.attend: the Triton path (MAGICDEC_TRITON_ON_CPU=1) against the CPU path, target and sparse views
import os
from magicdec.cache.paged import PagedKVCache, PagedView

cache = PagedKVCache(2, N, Hkv, P, D, g, torch.float32, "cpu")
cache.k.copy_(torch.randn_like(cache.k))
cache.v.copy_(torch.randn_like(cache.v))
table = torch.stack([perm[:12], perm[12:24], perm[24:36]])
positions = torch.tensor([[700, 701, 702, 703], [40, 41, -1, -1], [300, 301, 302, 303]])
read = torch.stack([table[:, 0], table[:, 3], table[:, 4]], 1)
read_pos = torch.cat([torch.arange(P).expand(B, -1), torch.arange(3 * P, 5 * P).expand(B, -1)], 1).clone()
read1 = torch.stack([table[:, 0], table[:, 9], table[:, 10]], 1)  # layer 1 reads other blocks than layer 0
read_pos1 = torch.cat([torch.arange(P).expand(B, -1), torch.arange(9 * P, 11 * P).expand(B, -1)], 1).clone()
read_pos1[1, P:] = -1  # row 1 (at position 40) holds nothing there
views = {"target": dict(), "sparse": dict(read=read, read_pos=read_pos, window=90, sinks=4),
         "per-layer": dict(read=torch.stack([read, read1]), read_pos=torch.stack([read_pos, read_pos1]), window=90,
                           sinks=4, score_layers="layer")}
q = torch.randn(B, Hkv * g, 4, D)
kn, vn = torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 4, D)
for name, kw in views.items():
    res = {}
    for flag in ("0", "1"):
        os.environ["MAGICDEC_TRITON_ON_CPU"] = flag
        layer = 1 if name == "per-layer" else 0
        nr = kw.get("read", table).shape[-1]
        scores = torch.zeros(2, B, nr) if name == "per-layer" else torch.zeros(B, nr)
        step = PagedView(cache, table, scores=scores, **kw).begin(positions)
        assert step.triton == (flag == "1")
        res[flag] = step.attend(layer, q, kn, vn), scores[layer] if name == "per-layer" else scores
        if name == "per-layer":
            assert scores[0].max() == 0  # layer 0 did not run
    assert (res["0"][0] - res["1"][0]).abs().max() < 1e-4, name
    assert (res["0"][1] - res["1"][1]).abs().max() < 1e-5, name
    assert res["1"][1].max() > 0, name
print("ok")
'''


@pytest.mark.parametrize("head_dim", [64, 80])
def test_paged_attention_in_the_triton_interpreter(head_dim: int) -> None:
    interpret(SCRIPT, head_dim)
