"""magicdec.model.quant: int8 per-row and int4 group-wise quantization, the quantized copy of a model (shared
embedding, norms, rotary buffers and biases; QuantLinear / QuantLinear4 layers; the original untouched), its
memory estimate, its logits against the original's (a small random model, every CPU path, and the real
SmolLM2), the fallbacks, and greedy self-speculation with the quantized drafts equal to plain decoding.
The int8 kernel itself (`cpu.linear_int8`) is tested in test_cpu_kernels.py (`-k int8`); the int4 one is
PyTorch's (`aten._weight_int4pack_mm_for_cpu`), checked here against the dequantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PagedRows, full_logits, random_prompts, tiny_config, write_checkpoint
from magicdec import LLM
from magicdec.kernels import cpu
from magicdec.model import quant
from magicdec.model.llama import Transformer
from magicdec.model.quant import (
    GROUP_SIZE,
    QuantLinear,
    QuantLinear4,
    dequantize_int4,
    int4_kernel_available,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    quantize_weights,
    quantized_bytes,
    unpack_nibbles,
)
from magicdec.runtime.sampling import SamplingParams
from magicdec.spec.config import SpecConfig

LINEAR_NAMES = ("wqkv", "wo", "w_gate_up", "w_down", "lm_head")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied+biases"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    """A small random model: untied without biases, or with a tied LM head and q/k/v and output biases."""
    tied = request.param
    cfg = tiny_config(tie_word_embeddings=tied, attention_bias=tied, o_proj_bias=tied)
    path = write_checkpoint(tmp_path_factory.mktemp("quant"), cfg, seed=0)
    return LLM(path, device="cpu").model


def logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """One forward of ids [B, T] from position 0 on a fresh cache."""
    return full_logits(model, ids)


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in LINEAR_NAMES}


# ------------------------------------------------------------------------------------------ quantize_int8


def test_quantize_int8_is_symmetric_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 37, generator=g) * torch.logspace(-3, 1, 50)[:, None]
    w[7] = 0  # an all-zero row
    q, s = quantize_int8(w, chunk_bytes=37 * 4 * 8)  # several chunks, the last one partial
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (50,)
    assert q.abs().max() <= 127 and s[7] == 0 and (q[7] == 0).all()
    rows = torch.arange(50) != 7
    assert (q[rows].abs().amax(1) == 127).all()  # each row's largest weight maps to ±127
    assert torch.allclose(s, w.abs().amax(1) / 127)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] * 0.5 * (1 + 1e-5) + 1e-12).all()  # rounding to the nearest step
    assert torch.equal(quantize_int8(w)[0], q)  # chunking changes nothing
    assert torch.equal(quantize_int8(w.bfloat16())[0], quantize_int8(w.bfloat16().float())[0])


# ------------------------------------------------------------------------------------------ the model copy


def test_quantized_copy_shares_all_but_its_linear_layers(tiny: Transformer) -> None:
    qm = quantize_weights(tiny)
    assert isinstance(qm, Transformer) and qm is not tiny
    # shared: embedding (the same module and storage), norms, rotary buffers, biases
    assert qm.embed is tiny.embed and qm.embed.weight.data_ptr() == tiny.embed.weight.data_ptr()
    assert qm.norm is tiny.norm and qm.rope is tiny.rope
    assert qm.rope.ropes[0].inv_freq.data_ptr() == tiny.rope.ropes[0].inv_freq.data_ptr()
    for qb, b in zip(qm.layers, tiny.layers, strict=True):
        assert qb is not b and qb.attn_norm is b.attn_norm and qb.mlp_norm is b.mlp_norm
        assert (qb.attn.n_heads, qb.attn.n_kv_heads, qb.attn.head_dim, qb.attn.layer, qb.mlp.intermediate) == (
            b.attn.n_heads, b.attn.n_kv_heads, b.attn.head_dim, b.attn.layer, b.mlp.intermediate)
        if b.attn.wqkv.bias is not None:
            assert qb.attn.wqkv.bias is b.attn.wqkv.bias
            assert qb.attn.wo_bias is b.attn.wo_bias
    # every linear layer is a QuantLinear in the copy, and still an nn.Linear in the original
    q_lin, lin = linears(qm), linears(tiny)
    assert q_lin.keys() == lin.keys() and len(lin) == 4 * len(tiny.layers) + 1
    assert not any(isinstance(m, nn.Linear) for m in qm.modules())
    for name, m in q_lin.items():
        assert isinstance(m, QuantLinear) and isinstance(lin[name], nn.Linear)
        assert m.weight_q.dtype == torch.int8 and m.scales.dtype == torch.float32
        assert m.weight_q.shape == lin[name].weight.shape
        assert (m.dequantized() - lin[name].weight).abs().max() <= m.scales.max() / 2 * 1.001
    if tiny.config.tie_word_embeddings:  # the tied head gets its own int8 copy; the embedding stays float
        assert tiny.lm_head.weight is tiny.embed.weight
        assert (qm.lm_head.dequantized() - tiny.embed.weight).abs().max() <= qm.lm_head.scales.max() / 2 * 1.001
    assert qm.kv_heads == tiny.kv_heads and qm.dtype == tiny.dtype and qm.device == tiny.device
    # memory: the estimate (from the original) is what the copy holds
    held = sum(m.weight_q.numel() + 4 * m.scales.numel() for m in q_lin.values())
    assert quantized_bytes(tiny) == quantized_bytes(qm) == held
    cfg = tiny.config
    per_layer = [(cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size), (cfg.hidden_size, cfg.q_size),
                 (2 * cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size)]
    expected = cfg.n_layers * sum(n * k + 4 * n for n, k in per_layer) + cfg.vocab_size * (cfg.hidden_size + 4)
    assert held == expected
    with pytest.raises(ValueError, match="3 bits"):
        quantized_bytes(tiny, bits=3)
    with pytest.raises(ValueError, match="3 bits"):
        quantize_weights(tiny, bits=3)


def test_quantized_logits_are_close(tiny: Transformer) -> None:
    qm = quantize_weights(tiny)
    ids = torch.tensor(random_prompts(4, [24], tiny.config.vocab_size, seed=1))
    ref, out = logits(tiny, ids), logits(qm, ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"relative error {rel:.4f}, top-1 agreement {agree:.3f}")
    assert rel < 0.05, rel
    assert agree >= 0.9, agree
    # decode-shaped forwards (the draft's) use the int8 kernel and agree with one prefill-sized forward
    rows = PagedRows(qm, 4, 32)
    steps = torch.cat([rows(ids[:, t : t + 1], torch.full((4, 1), t)) for t in range(ids.shape[1])], 1)
    assert (steps - out).abs().max() / out.abs().max() < 1e-5


def test_quantized_model_uses_the_kernel_and_its_fallback_agrees(tiny: Transformer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    qm = quantize_weights(tiny)
    ids = torch.tensor(random_prompts(2, [9], tiny.config.vocab_size, seed=2))
    calls = []
    real = cpu.linear_int8
    monkeypatch.setattr(cpu, "linear_int8", lambda *a: calls.append(1) or real(*a))
    kernel = logits(qm, ids)
    assert len(calls) == 4 * len(qm.layers) + 1
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")  # dequantize on the fly + F.linear
    assert not cpu.available()
    fallback = logits(qm, ids)
    assert (fallback - kernel).abs().max() / kernel.abs().max() < 1e-5


def test_quantized_linear_layer() -> None:
    """QuantLinear alone: shares the bias, runs the CPU path (kernel) and the path off the CPU (CUDA:
    F.linear on the weight dequantized per call, run here on CPU tensors), which agree."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(40, 24, bias=True)
    qlin = QuantLinear.from_linear(lin)
    assert qlin.bias is lin.bias and qlin.in_features == 40 and qlin.out_features == 24
    x = torch.randn(5, 40, generator=g)
    with torch.no_grad():
        y, ref = qlin(x), lin(x)
        assert torch.equal(y, cpu.linear_int8(x, qlin.weight_q, qlin.scales, lin.bias))
        off_cpu = qlin.forward_dequantized(x)
        assert torch.equal(off_cpu, F.linear(x, qlin.weight_q.float() * qlin.scales[:, None], lin.bias))
        assert (y - off_cpu).abs().max() / off_cpu.abs().max() < 1e-5
        assert (y - ref).abs().max() < 0.05 * ref.abs().max()
        assert qlin.forward_dequantized(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        QuantLinear(torch.zeros(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match=r"float32 \[3\]"):
        QuantLinear(torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))


def test_forward_hooks_are_carried_over(tiny: Transformer) -> None:
    """Tensor parallelism hangs its all-reduce / all-gather on wo, w_down and lm_head: the copy keeps them."""
    seen = []
    handle = tiny.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape) or out * 2)
    try:
        qm = quantize_weights(tiny)
        ids = torch.tensor(random_prompts(1, [5], tiny.config.vocab_size, seed=4))
        out = logits(qm, ids)
    finally:
        handle.remove()
    assert seen == [(1, 5, tiny.config.vocab_size)]
    assert (out / 2 - logits(quantize_weights(tiny), ids)).abs().max() < 1e-6
    assert not tiny.lm_head._forward_hooks  # removed from the original; its copy in qm is qm's own


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_model_quantizes_and_decodes(dtype: torch.dtype) -> None:
    from magicdec.loading.random_init import random_model

    cfg = tiny_config(vocab_size=200, hidden_size=128, intermediate_size=200, n_heads=4, n_kv_heads=2, n_layers=2)
    model = random_model(cfg, "cpu", dtype, seed=0)
    qm = quantize_weights(model)
    ids = torch.tensor(random_prompts(2, [6], cfg.vocab_size, seed=5))
    ref, out = logits(model, ids), logits(qm, ids)
    assert out.dtype == dtype
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 0.05


def test_meta_model_is_refused_but_estimated() -> None:
    model = Transformer(tiny_config(), device="meta")
    assert quantized_bytes(model) > 0
    with pytest.raises(ValueError, match="meta"):
        quantize_weights(model)


# ---------------------------------------------------------------------------------------------- SmolLM2


def greedy(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after `prompt` (a prefill, then one-token decode steps) and the logits [n, V] that
    chose them."""
    rows = PagedRows(model, 1, len(prompt) + n + 8)
    tokens, chosen = [], []
    out = rows(torch.tensor([prompt]), torch.arange(len(prompt))[None])[0, -1]
    for i in range(n):
        chosen.append(out)
        tokens.append(int(out.argmax()))
        out = rows(torch.tensor([[tokens[-1]]]), torch.tensor([[len(prompt) + i]]))[0, -1]
    return tokens, torch.stack(chosen)


def forced_agreement(smol: LLM, qm: Transformer) -> tuple[list[int], list[int], list[bool], torch.Tensor]:
    """The prompt, the target's 16 greedy tokens after it, and the quantized copy `qm` fed them (as a draft
    is, up to the first rejection): whether its top-1 is each token, and its logits' cosine to the target's."""
    prompt = smol.tokenizer.encode("The capital of France is")
    target, target_logits = greedy(smol.model, prompt, 16)
    seq = prompt + target
    forced = logits(qm, torch.tensor([seq]))[0, len(prompt) - 1 : len(seq) - 1]
    agree = (forced.argmax(-1) == torch.tensor(target)).tolist()
    return prompt, target, agree, F.cosine_similarity(forced, target_logits, dim=-1)


def test_smollm2_int8_draft_agrees_with_the_target(smol: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    """The real model: the int8 copy, fed the target's greedy tokens (as a draft is, up to the first
    rejection), predicts most of them, with logits nearly parallel to the target's."""
    qm = quantize_weights(smol.model)
    assert quantized_bytes(smol.model) == quantized_bytes(qm)
    prompt, target, agree, cos = forced_agreement(smol, qm)
    free, _ = greedy(qm, prompt, 16)
    with capsys.disabled():
        print(f"\nSmolLM2 int8 vs float32, 16 greedy tokens: top-1 agreement {sum(agree)}/16 "
              f"({''.join('=' if a else 'x' for a in agree)}), logits cosine min {cos.min():.4f} "
              f"mean {cos.mean():.4f}; free-running int8 greedy equal for "
              f"{next((i for i, (a, b) in enumerate(zip(target, free)) if a != b), 16)}/16 tokens")
    assert sum(agree) >= 12
    assert cos.mean() > 0.99 and cos.min() > 0.97


def test_smollm2_int4_draft_agrees_with_the_target(smol: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    """The real model's int4 copy (through PyTorch's int4 op), fed the target's greedy tokens, predicts most
    of them; its memory is what the estimate and the cost model say (0.5 + 4/32 bytes a weight)."""
    from magicdec.costmodel.steps import QUANT_WEIGHT_BYTES

    qm = quantize_weights(smol.model, 4)
    layers = [m for m in qm.modules() if isinstance(m, QuantLinear4)]
    assert len(layers) == 4 * len(qm.layers) + 1 and all(m.kernel for m in layers) == int4_kernel_available("cpu")
    weights = sum(m.in_features * m.out_features for m in layers)
    assert quantized_bytes(smol.model, 4) == quantized_bytes(qm, 4) == weights * QUANT_WEIGHT_BYTES[4]  # no padding
    _, _, agree, cos = forced_agreement(smol, qm)
    with capsys.disabled():
        print(f"\nSmolLM2 int4 vs float32, 16 greedy tokens: top-1 agreement {sum(agree)}/16 "
              f"({''.join('=' if a else 'x' for a in agree)}), logits cosine min {cos.min():.4f} mean {cos.mean():.4f}")
    assert sum(agree) >= 11
    assert cos.mean() > 0.98 and cos.min() > 0.95


# ------------------------------------------------------------------------------------------------- int4


def test_quantize_int4_error_bound_and_layout() -> None:
    """Group-wise asymmetric int4: codes in [0, 15], bfloat16 (scale, zero) per group of 32 in the ops'
    [K/32, N, 2] layout, every weight within about half a step of its dequantized value; padding."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 70, generator=g) * torch.logspace(-3, 1, 50)[:, None]  # K = 70: padded to 96
    w[7] = 0  # an all-zero row
    w[9, :32] = 0.25  # a constant group
    codes, sz = quantize_int4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 96) and codes.max() <= 15  # N padded to 16s
    assert sz.dtype == torch.bfloat16 and sz.shape == (3, 64, 2)
    deq = dequantize_int4(codes, sz)
    assert deq.shape == (64, 96) and (deq[50:] == 0).all()  # (padded columns: x is padded with zeros)
    step = sz[..., 0].float().t().repeat_interleave(GROUP_SIZE, 1)[:50, :70]  # each weight's group's scale
    err = (deq[:50, :70] - w).abs()
    assert (err <= 0.5 * step * 1.02 + 1e-6 * w.abs()).all(), (err / step).max()  # bfloat16 s, z: ≤ 2% over
    assert (deq[7] == 0).all() and torch.allclose(deq[9, :32], torch.full((32,), 0.25), rtol=4e-3)
    # each group's extremes are representable: the codes span 0..15 where a group varies
    spans = codes[:50].reshape(50, 3, 32).int()
    varied = torch.ones(50, 2, dtype=torch.bool)
    varied[7], varied[9, 0] = False, False
    assert ((spans.amax(-1) - spans.amin(-1))[:, :2][varied] >= 14).all()
    assert quantize_int4(w[:, :64], pad=False)[0].shape == (50, 64)
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int4(w, pad=False)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    pair = torch.tensor([[1, 2]], dtype=torch.uint8)
    assert torch.equal(pack_nibbles(pair), torch.tensor([[0x21]], dtype=torch.uint8))


@pytest.mark.parametrize("shape", [(96, 320), (40, 24)], ids=["aligned", "padded"])
def test_int4_linear_layer(shape: tuple[int, int]) -> None:
    """QuantLinear4 alone: PyTorch's int4 op (x in bfloat16) against F.linear on the dequantized weight, the
    per-call dequantizing fallback, the codes recovered from the op's packing, bias and dtypes."""
    if not int4_kernel_available("cpu"):
        pytest.skip("this torch has no working CPU int4 matmul")
    k, n = shape
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(k, n, bias=True)
    qlin = QuantLinear4.from_linear(lin)  # aligned: rows packed in two chunks (256 + 64)
    plain = QuantLinear4.from_linear(lin, kernel=False)
    assert qlin.kernel and not plain.kernel and qlin.bias is lin.bias
    assert (qlin.in_features, qlin.out_features) == (k, n) and qlin.weight_packed.dtype == torch.uint8
    assert torch.equal(qlin.codes(), plain.codes()) and torch.equal(qlin.scales_zeros, plain.scales_zeros)
    assert torch.equal(qlin.dequantized(), plain.dequantized()) and qlin.dequantized().shape == (n, k)
    assert quantized_bytes(nn.Sequential(qlin), 4) == quantized_bytes(nn.Sequential(lin), 4) == \
        quantized_bytes(nn.Sequential(plain), 4)
    x = torch.randn(2, 5, k, generator=g)
    with torch.no_grad():
        y, fallback, full = qlin(x), plain(x), lin(x)
        ref = F.linear(x.bfloat16().float(), qlin.dequantized(), lin.bias)  # the op rounds x (and y) to bf16
        assert y.shape == (2, 5, n) and y.dtype == torch.float32
        assert (y - ref).norm() / ref.norm() < 5e-3
        assert torch.equal(fallback, F.linear(x, plain.dequantized(), lin.bias))
        assert (y - fallback).norm() / fallback.norm() < 1e-2
        assert (y - full).norm() / full.norm() < 0.15  # int4 of a uniform init: ~6% here
        assert torch.equal(qlin.forward_dequantized(x), fallback)
        assert qlin(x.bfloat16()).dtype == torch.bfloat16
        one = torch.stack([qlin(x[:, i]) for i in range(5)], 1)  # rows do not depend on the other rows
        assert torch.equal(one, y)
    with pytest.raises(ValueError, match="bfloat16"):
        QuantLinear4(plain.weight_packed, plain.scales_zeros.float(), k, n)
    with pytest.raises(ValueError, match="pack_nibbles"):
        QuantLinear4(plain.weight_packed[:, :-1], plain.scales_zeros, k, n)
    with pytest.raises(ValueError, match="do not fit"):
        QuantLinear4(plain.weight_packed, plain.scales_zeros, k + 64, n)


def test_int4_copy_of_the_model(tiny: Transformer) -> None:
    """quantize_weights(model, 4): QuantLinear4 layers (the tied head its own), the rest shared, memory as
    estimated, logits close to the original's, decode-shaped forwards agreeing with a prefill-sized one,
    and the op agreeing with the dequantizing fallback."""
    qm = quantize_weights(tiny, 4)
    assert qm.embed is tiny.embed and qm.norm is tiny.norm
    q_lin, lin = linears(qm), linears(tiny)
    assert q_lin.keys() == lin.keys() and all(isinstance(m, QuantLinear4) for m in q_lin.values())
    for name, m in q_lin.items():
        if lin[name].bias is not None:
            assert m.bias is lin[name].bias
        err = (m.dequantized() - lin[name].weight).abs().max()
        assert err <= m.scales_zeros[..., 0].float().max() * 0.51
    held = sum(m.weight_packed.numel() * m.weight_packed.element_size() + 2 * m.scales_zeros.numel()
               for m in q_lin.values())
    assert quantized_bytes(tiny, 4) == quantized_bytes(qm, 4) == held
    ids = torch.tensor(random_prompts(4, [24], tiny.config.vocab_size, seed=1))
    ref, out = logits(tiny, ids), logits(qm, ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"int4: relative error {rel:.4f}, top-1 agreement {agree:.3f}")
    assert rel < 0.4, rel  # int4 of this small random model (weights N(0, 0.08)): ~25%; a wrong layout: ~140%
    assert agree >= 0.5, agree
    rows = PagedRows(qm, 4, 32)
    steps = torch.cat([rows(ids[:, t : t + 1], torch.full((4, 1), t)) for t in range(ids.shape[1])], 1)
    assert (steps - out).abs().max() / out.abs().max() < 2e-2  # bfloat16 activations: not bitwise
    if int4_kernel_available("cpu"):
        for m in q_lin.values():  # the same codes, dequantized per call
            m.kernel = False
            m.weight_packed = pack_nibbles(quant._codes_from_op(m.weight_packed, m.padded_out, m.padded_in,
                                                                m.group_size))
        fallback = logits(qm, ids)
        assert (fallback - out).norm() / out.norm() < 2e-2


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_self_draft_greedy_equals_plain_decoding(tmp_path_factory: pytest.TempPathFactory,
                                                           weights: str) -> None:
    """Greedy self-speculation with the quantized draft (ragged prompts; a tied head and biases) gives plain
    decoding's tokens, with drafts accepted and rejected."""
    cfg = tiny_config(tie_word_embeddings=True, attention_bias=True, o_proj_bias=True)
    llm = LLM(write_checkpoint(tmp_path_factory.mktemp("quant-spec"), cfg, seed=0), device="cpu")
    prompts = random_prompts(3, [90, 150, 41], cfg.vocab_size, seed=6)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = llm.generate(prompts, params)
    spec = llm.generate(prompts, params, SpecConfig(method="self", budget=32, sinks=4, gamma=3, draft_weights=weights))
    assert [o.token_ids for o in spec.outputs] == [o.token_ids for o in plain.outputs]
    assert 0 < spec.stats.acceptance_rate < 1, spec.stats.acceptance_rate
    assert isinstance(llm.models.quantized(weights).lm_head, QuantLinear4 if weights == "int4" else QuantLinear)


def test_quantize_weights_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="Transformer"):
        quantize_weights(nn.Linear(3, 3))  # type: ignore[arg-type]
