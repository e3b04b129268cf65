"""Mixtures of experts in the one decoder (issue 26): Qwen3-MoE (a dense layer among sparse ones), Qwen2-MoE
(a gated shared expert), Mixtral (a sliding window), OLMoE (q/k norms over all heads) and GPT-OSS (attention
sinks, alternating sliding and full layers, the router's bias and softmax after top-k, the clamped SwiGLU with
biases) as tiny random checkpoints saved by transformers' own config classes: magicdec's greedy tokens are
transformers', speculation gives plain decoding's tokens, the MoE forward is batch-invariant, and two tensor-parallel
gloo ranks give one process's tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import (
    PagedRows,
    check_self_draft_is_plain,
    full_logits,
    gguf_writer,
    hf_greedy,
    random_prompts,
    save_sharp,
    spawn_ranks,
)
from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig

WINDOW = 32
BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, num_experts_per_tok=2)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "moe_intermediate_size": 32, "mlp_only_layers": [1],
                                     "norm_topk_prob": True}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "sliding_window": WINDOW}),
    "olmoe": ("OlmoeConfig", {"num_experts": 8}),
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "sliding_window": WINDOW, "num_hidden_layers": 2,
                                 "layer_types": ["sliding_attention", "full_attention"],
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
}
# the router's logits (and GPT-OSS's sinks) larger than the other weights: decisive routing, sinks that matter
SCALES = {"gate.weight": 4.0, "router.weight": 4.0, "sinks": 10.0}


def write_moe(path: Path, family: str, seed: int = 0, **changes: Any) -> Path:
    import transformers

    name, overrides = FAMILIES[family]
    config = getattr(transformers, name)(**{**BASE, **overrides, **changes})
    return save_sharp(config, path, seed, scales=SCALES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {f: write_moe(root / f, f) for f in FAMILIES}


PROMPTS = random_prompts(3, [70, 23, 45], 384, seed=7)  # the first past the window (32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers(family: str, checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    path = checkpoints[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = LLM(path, device="cpu")
    assert ours.config.n_experts == FAMILIES[family][1].get("num_experts", FAMILIES[family][1].get("num_local_experts"))
    result = ours.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, result.outputs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), (family, len(prompt))


def test_serving_engine_decodes_like_transformers(checkpoints: dict[str, Path]) -> None:
    """The online `Engine`, requests queued one by one (GPT-OSS: sinks, sliding and full layers)."""
    from transformers import AutoModelForCausalLM

    from magicdec import Engine

    path = checkpoints["gpt_oss"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(llm=LLM(path, device="cpu"), max_num_seqs=4, quiet=True)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=10, ignore_eos=True)) for p in PROMPTS]
    outs: dict[Any, list[int]] = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    engine.close()
    for i, prompt in zip(ids, PROMPTS):
        assert outs[i] == hf_greedy(hf, prompt, 10), len(prompt)


SELF_DRAFTS = {
    "streaming": dict(drafter="streaming", budget=24, sinks=4),
    "snapkv": dict(drafter="snapkv", budget=24, tuning=DraftTuning(snapkv_window=8, observe=8)),
    "guided": dict(drafter="guided", budget=192),
}


@pytest.mark.parametrize("drafter", sorted(SELF_DRAFTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_self_speculation_equals_plain_decoding(family: str, drafter: str, checkpoints: dict[str, Path]) -> None:
    """Drafts read the experts (full weights, or int8 ones: alternating, so that each drafter meets both) and
    verification gives plain decoding's tokens: the MoE forward is batch-invariant."""
    weights = ("full", "int8")[(sorted(FAMILIES).index(family) + sorted(SELF_DRAFTS).index(drafter)) % 2]
    check_self_draft_is_plain(LLM(checkpoints[family], device="cpu"), SELF_DRAFTS[drafter], weights, 16)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_moe_forward_is_batch_invariant(family: str, checkpoints: dict[str, Path], kernels: None) -> None:
    """A decode-shaped row alone and the same row among different rows (other experts active): bitwise equal,
    for the MoE module and for the whole model's logits."""
    from magicdec.model.moe import MoE

    model = LLM(checkpoints[family], device="cpu").model
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 64, generator=g)
    with torch.inference_mode():
        batch = moe(x)
        for b in range(6):
            assert torch.equal(moe(x[b:b + 1]), batch[b:b + 1]), b
            assert torch.equal(moe(x[b:b + 1, 1:2]), batch[b:b + 1, 1:2]), b
    ids = torch.tensor(random_prompts(5, [4], 384, seed=1))
    pos = torch.arange(4).expand(5, -1)
    together = PagedRows(model, 5, 64)(ids, pos)
    for b in range(5):
        alone = PagedRows(model, 1, 64)(ids[b:b + 1], pos[b:b + 1])
        assert torch.equal(alone, together[b:b + 1]), b


def test_counting_the_experts_a_forward_reads(checkpoints: dict[str, Path]) -> None:
    """`track_expert_reads`: each MoE layer records how many distinct experts each forward ran (≤ n_experts, ≥ k);
    one token reads exactly k per layer; off again, nothing is recorded."""
    from magicdec.model.moe import track_expert_reads

    llm = LLM(checkpoints["qwen3_moe"], device="cpu")
    modules = track_expert_reads(llm.model)
    assert len(modules) == 2  # layer 1 is dense (mlp_only_layers)
    rows = PagedRows(llm.model, 1, 64)
    rows(torch.tensor([PROMPTS[0][:40]]), torch.arange(40)[None])
    rows(torch.tensor([[5]]), torch.tensor([[40]]))
    for m in modules:
        assert m.reads is not None and len(m.reads) == 2
        assert m.reads[0][0] == 40 and 2 <= m.reads[0][1] <= 8 and m.reads[1] == (1, 2)
        assert sum(m.picks) == 41 * 2
    track_expert_reads(llm.model, on=False)
    rows(torch.tensor([[6]]), torch.tensor([[41]]))
    assert all(m.reads is None for m in modules)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parameter_count_is_transformers(family: str, checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32)
    assert LLM(checkpoints[family], device="cpu").config.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_sinks_in_the_cpu_kernels_match_pytorch(kernels: None) -> None:
    """The dense and paged kernels with sinks (large ones and small ones, a row that sees one slot) against the
    float32 PyTorch reference; without sinks, the kernel's result is unchanged."""
    from magicdec.kernels import cpu

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, S, D = 2, 4, 2, 3, 130, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    allowed = torch.rand(B, T, S, generator=g) < 0.5
    allowed[0, 0] = False
    allowed[0, 0, 7] = True
    sinks = torch.tensor([-3.0, 0.0, 2.0, 30.0])
    out = cpu.attention(q, k, v, allowed, sinks)
    ref = cpu.attention_with_sinks(q, k, v, allowed, sinks)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, cpu.attention(q, k, v, allowed), atol=1e-3)
    pool_k, pool_v = (torch.cat([t, torch.zeros(B, Hkv, 192 - S, D)], 2).view(B, Hkv, 3, 64, D)
                      .permute(0, 2, 1, 3, 4).reshape(B * 3, Hkv, 64, D) for t in (k, v))
    table = torch.arange(B * 3).view(B, 3)
    wide = torch.nn.functional.pad(allowed, (0, 192 - S))
    assert torch.equal(cpu.paged_attention(q, pool_k, pool_v, table, wide, sinks=sinks), out)


def write_mxfp4(source: Path, path: Path) -> Path:
    """A copy of a GPT-OSS checkpoint whose experts are random MXFP4 (`*_blocks`, `*_scales`, as published)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    path = shutil.copytree(source, path)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, w in load_file(path / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] → [E, out, in/32, 16]
            e, rows, cols = w.shape
            tensors[name + "_blocks"] = torch.randint(0, 256, (e, cols, rows // 32, 16), dtype=torch.uint8,
                                                      generator=gen)
            tensors[name + "_scales"] = torch.randint(123, 128, (e, cols, rows // 32), dtype=torch.uint8,
                                                      generator=gen)
        else:
            tensors[name] = w
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_mxfp4_checkpoint_is_dequantized_at_load(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A GPT-OSS checkpoint whose experts are MXFP4 (`*_blocks`, `*_scales`, as published): the weights are
    transformers' own dequantization of them (`Mxfp4Config(dequantize=True)`), and greedy tokens are its."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from magicdec.loading.mxfp4 import dequantize

    path = write_mxfp4(checkpoints["gpt_oss"], tmp_path / "mxfp4")
    tensors = load_file(path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              quantization_config=Mxfp4Config(dequantize=True)).eval()
    experts = hf.model.layers[0].mlp.experts
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(dequantize(tensors[name + "_blocks"], tensors[name + "_scales"]), experts.gate_up_proj)
    ours = LLM(path, device="cpu")
    gate_up = ours.model.layers[0].mlp.experts[1].w_gate_up.weight
    assert torch.equal(gate_up, torch.cat([experts.gate_up_proj[1, :, ::2].T, experts.gate_up_proj[1, :, 1::2].T]))
    result = ours.generate(PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))
    for prompt, out in zip(PROMPTS, result.outputs):
        assert out.token_ids == hf_greedy(hf, prompt, 10), len(prompt)
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (path / "config.json").write_text(json.dumps(cfg))
    from magicdec.loading import LoadError

    with pytest.raises(LoadError, match="bitsandbytes"):
        LLM(path, device="cpu")


def test_served_greedy_equals_transformers(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """`magicdec serve` on the GPT-OSS checkpoint (self-speculation on): the completions of token-id prompts, one
    past the window, are transformers' greedy tokens."""
    import httpx
    from test_server import ENGINE, started
    from transformers import AutoModelForCausalLM

    path = checkpoints["gpt_oss"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = LLM(path, device="cpu").tokenizer
    args = ["--model", str(path), *ENGINE, "--spec", "self", "--budget", "24", "--sinks", "4", "--gamma", "2"]
    for server in started(tmp_path, "gpt_oss", args):
        name = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        for prompt in PROMPTS:
            body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == tokenizer.decode(hf_greedy(hf, prompt, 12)), len(prompt)


def test_speculative_sampling_on_a_moe_keeps_the_target_distribution(tmp_path: Path, threads: None) -> None:
    """χ² of 3 sampled tokens against the exact joint distribution, on a GPT-OSS-like model (sinks, a sliding
    layer of window 16 and a global one, 4 experts) with a 40-token prompt, drafting with int8 experts."""
    from test_spec_sampling import VOCAB, engine_chi2


    torch.set_num_threads(1)
    path = write_moe(tmp_path / "gpt_oss", "gpt_oss", seed=5, vocab_size=VOCAB, sliding_window=16)
    llm = LLM(path, device="cpu")
    assert llm.config.layer_windows == (16, 0) and llm.config.attn_sinks
    spec = SpecConfig(method="self", gamma=2, drafter="streaming", budget=8, sinks=2, draft_weights="int8")
    pvalues, rate = engine_chi2(llm, spec)
    assert rate is not None and 0.05 <= rate <= 0.99
    assert min(pvalues.values()) > 1e-3, pvalues


TRITON_SINKS_SCRIPT = '''
from magicdec.kernels.cpu import attention_with_sinks, gather_pages
from magicdec.kernels.decode_attention import MIN_SPLIT, decode_attention
from magicdec.kernels.paged_attention import paged_attention

g = torch.Generator().manual_seed(0)
D = 16
for B, S in ((2, MIN_SPLIT * 2 + 100), (40, 300)):  # several splits (the merge adds the sinks), then one
    Hq, Hkv, T = 4, 2, 2
    q = torch.randn(B, Hq, T, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    qpos = torch.randint(0, S, (B, T), generator=g, dtype=torch.int32)
    qpos[0, 0] = 0  # a row that sees one slot
    sinks = torch.tensor([-3.0, 0.0, 2.0, 9.0])
    allowed = torch.arange(S)[None, None, :] <= qpos[..., None]
    ref = attention_with_sinks(q, k, v, allowed, sinks)
    out = decode_attention(q, k, v, qpos, sinks=sinks)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (B, (out - ref).abs().max())
    P = 64
    nb = -(-S // P)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, nb * P - S))
    perm = torch.randperm(B * nb, generator=g)
    pool_k, pool_v = (torch.empty(B * nb, Hkv, P, D) for _ in range(2))
    for pool, t in ((pool_k, k), (pool_v, v)):
        pool[perm] = pad(t).view(B, Hkv, nb, P, D).permute(0, 2, 1, 3, 4).reshape(B * nb, Hkv, P, D)
    table = perm.view(B, nb)
    assert torch.equal(gather_pages(pool_k, table)[:, :, :S], k)
    out = paged_attention(q, pool_k, pool_v, table, qpos, sinks=sinks)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (B, (out - ref).abs().max())
print("ok")
'''


def test_sinks_in_the_triton_kernels_in_the_interpreter() -> None:
    """The dense and paged split-KV kernels with sinks, with several splits (the merge) and one, against PyTorch."""
    pytest.importorskip("triton")
    from test_triton_attention import SCRIPT, interpret

    interpret(SCRIPT.split("from magicdec.kernels.decode_attention")[0] + TRITON_SINKS_SCRIPT, 16)


MOE_MODEL_SCRIPT = '''
import os
from magicdec.cache.paged import PagedKVCache, PagedView
from magicdec.config import ModelConfig
from magicdec.loading.random_init import random_model

cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, name="t", sliding_window=16, layer_types=("sliding", "full"), n_experts=4,
                  n_experts_per_token=2, router_softmax="after", router_bias=True, expert_bias=True,
                  swiglu_alpha=1.702, swiglu_limit=7.0, attn_sinks=True, attention_bias=True, o_proj_bias=True)
model = random_model(cfg, "cpu", torch.float32, seed=0)
for layer in model.layers:
    layer.attn.sinks.normal_(0, 2)
ids = torch.randint(0, 96, (2, 40))
pos = torch.arange(40).expand(2, -1)

def run():
    pool = PagedKVCache.for_model(model, 4, 64)
    cache = PagedView(pool, torch.tensor([[2, 0], [1, 3]]))
    with torch.inference_mode():
        a = model(ids[:, :30], pos[:, :30], cache)  # a prefill chunk (PyTorch)
        b = model(ids[:, 30:31], pos[:, 30:31], cache)  # a decode step
        c = model(ids[:, 31:35], pos[:, 31:35], cache)  # a verification block
    return torch.cat([a, b, c], 1)

eager = run()
os.environ["MAGICDEC_TRITON_ON_CPU"] = "1"
triton_path = run()
assert (triton_path - eager).abs().max() < 1e-4, (triton_path - eager).abs().max()
print("ok")
'''


def test_gpt_oss_like_forward_through_the_triton_kernels_equals_eager() -> None:
    """A prefill chunk, a decode step and a verification block of a random GPT-OSS-shaped model (sinks, a sliding
    and a full layer, 4 experts) through the Triton paths (interpreted) equal the CPU paths."""
    pytest.importorskip("triton")
    from test_triton_attention import SCRIPT, interpret

    interpret(SCRIPT.split("from magicdec.kernels.decode_attention")[0] + MOE_MODEL_SCRIPT, 16)


def write_moe_gguf(path: Path, hf_dir: Path, arch: str) -> Path:
    """The float32 GGUF llama.cpp's converter writes for a Mixtral ("llama": q/k rows permuted for its interleaved
    RoPE), Qwen3-MoE or OLMoE checkpoint: expert metadata, the router as ffn_gate_inp, the experts stacked."""
    from magicdec.loading.gguf_file import _GLOBAL_NAMES, _LAYER_NAMES, _NORM_NAMES

    w, cfg, t = gguf_writer(path, hf_dir, arch)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    n = cfg.get("num_experts") or cfg["num_local_experts"]
    w.add_expert_count(n)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    names = {**_GLOBAL_NAMES, **_LAYER_NAMES, **_NORM_NAMES["pre"]}
    mixtral = arch == "llama"
    prefix, router = ("block_sparse_moe.experts.", "block_sparse_moe.gate.weight") if mixtral else (
        "mlp.experts.", "mlp.gate.weight")
    roles = {"w1": "gate", "w3": "up", "w2": "down"} if mixtral else {f"{r}_proj": r for r in ("gate", "up", "down")}

    def perm(x: torch.Tensor, heads: int) -> Any:
        a = x.numpy()
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for role, short in roles.items():
            stacked = torch.stack([t[f"{p}{prefix}{e}.{role}.weight"] for e in range(n)])
            w.add_tensor(f"blk.{i}.ffn_{short}_exps.weight", stacked.numpy())
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", t[p + router].numpy())
    for name, tensor in t.items():
        short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        if name.startswith("model.layers.") and ("experts" in short or short == router):
            continue
        gg = names[short] if not name.startswith("model.layers.") else f"blk.{name.split('.')[2]}.{names[short]}"
        heads = {"self_attn.q_proj.weight": cfg["num_attention_heads"], "self_attn.k_proj.weight":
                 cfg["num_key_value_heads"]}.get(short)
        w.add_tensor(gg, perm(tensor, heads) if mixtral and heads else tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("family", "arch"), [("mixtral", "llama"), ("qwen3_moe", "qwen3moe"), ("olmoe", "olmoe")])
def test_gguf_of_a_moe_loads_like_its_checkpoint(family: str, arch: str, checkpoints: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """The GGUF's description and weights are the Hugging Face checkpoint's (which decodes like transformers);
    llama.cpp's Qwen3-MoE has no dense layers and its Mixtral no sliding window: those checkpoints are written
    without them."""
    from magicdec.config import RopeScaling
    from magicdec.loading import load_model
    from magicdec.loading.gguf_file import load_gguf

    plain = {"qwen3_moe": {"mlp_only_layers": []}, "mixtral": {"sliding_window": None}}
    hf_dir = write_moe(tmp_path / "hf", family, **plain[family]) if family in plain else checkpoints[family]
    path = write_moe_gguf(tmp_path / f"{family}.gguf", hf_dir, arch)
    ref = load_model(hf_dir, device="cpu")
    for limit in (1 << 30, 0):  # converted once to safetensors, or dequantized at load
        ours, cfg = load_gguf(path, torch.float32, "cpu", tmp_path / f"conv{limit}", cache_limit_bytes=limit)
        same = dict(name="", eos_token_ids=(), bos_token_id=None, rms_norm_eps=0.0, rope_scaling=RopeScaling(),
                    max_position_embeddings=0)
        assert cfg.with_(**same) == ref.config.with_(**same)
        theirs = ref.model.state_dict()
        assert set(ours.state_dict()) == set(theirs)
        for name, p in ours.state_dict().items():
            assert torch.allclose(p, theirs[name], atol=1e-6, rtol=0), name


def tp_worker(rank: int, world: int, path: str, speculate: bool, result: str) -> None:
    """This rank's greedy tokens and logits, loaded sharded and loaded whole then cut; with `speculate`, the
    tokens of self-speculation (full and int8 draft weights)."""
    import torch.distributed as dist

    from magicdec.loading import load_model
    from magicdec.parallel.tp import TensorParallel, shard_model

    tp = TensorParallel(rank, world)
    llm = LLM(path, device="cpu", tp=tp)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    out: dict[str, Any] = {"plain": [o.token_ids for o in llm.generate(PROMPTS, params).outputs]}
    all_reduce, calls = dist.all_reduce, []
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
    try:
        out["logits"] = full_logits(llm.model, TP_IDS)
    finally:
        dist.all_reduce = all_reduce
    out["all_reduces"] = len(calls)  # in one forward
    whole = load_model(path, device="cpu").model
    shard_model(whole, tp)
    out["cut"] = full_logits(whole, TP_IDS)
    if speculate:
        for weights, drafter in (("full", "streaming"), ("int8", "snapkv")):
            spec = SpecConfig(method="self", gamma=3, draft_weights=weights, **SELF_DRAFTS[drafter])
            r = llm.generate(PROMPTS, params, spec)
            assert r.stats.acceptance.rounds > 0
            out[weights] = [o.token_ids for o in r.outputs]
    if rank == 0:
        torch.save(out, result)


TP_IDS = torch.tensor(random_prompts(2, [40], 384, seed=11))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "qwen2_moe", "mixtral", "olmoe", "gpt_oss_mxfp4"])
def test_two_gloo_ranks_give_one_process_tokens(family: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Each rank holds every expert's share of columns (GPT-OSS: its interleaved gate/up and their biases; the
    down bias on rank 0), the router and the shared expert's gate whole; one all-reduce per MoE layer, not per
    expert. Greedy
    tokens are one process's, so is self-speculation under TP (GPT-OSS), and a model loaded whole then cut
    computes what a sharded load does."""
    path = write_mxfp4(checkpoints["gpt_oss"], tmp_path / "mxfp4") if family == "gpt_oss_mxfp4" else checkpoints[family]
    speculate = family == "gpt_oss"
    spawn_ranks(tp_worker, 2, str(path), speculate, str(tmp_path / "rank0.pt"), timeout_s=300)
    sharded = torch.load(tmp_path / "rank0.pt")
    one = LLM(path, device="cpu")
    plain = [o.token_ids for o in one.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True)).outputs]
    assert sharded["plain"] == plain
    assert (sharded["logits"] - full_logits(one.model, TP_IDS)).abs().max() <= 1e-4
    assert torch.equal(sharded["cut"], sharded["logits"])
    per_layer = 4 if one.config.qk_norm == "full" else 2  # attention, the MLP or MoE (+ OLMoE's q and k norms)
    assert sharded["all_reduces"] == per_layer * one.config.n_layers
    if speculate:
        assert sharded["full"] == sharded["int8"] == plain


def test_an_indivisible_expert_size_is_refused_with_the_fix(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """An expert's (or the shared expert's) columns that the world size does not divide: a clear error naming
    them and the world sizes that work. A dense intermediate size that no layer uses does not matter."""
    import transformers

    from magicdec.config import ModelConfig
    from magicdec.parallel.tp import TensorParallel, check_shardable

    def config(family: str, **changes: Any) -> ModelConfig:
        name, overrides = FAMILIES[family]
        return ModelConfig.from_hf(getattr(transformers, name)(**{**BASE, **overrides, **changes}).to_dict())

    with pytest.raises(ValueError, match=r"36 expert columns are not divisible by 8 \(attention is split by KV "
                                         r"heads, each expert by its columns\)\. Use a world size of 1, 2"):
        check_shardable(config("qwen3_moe", moe_intermediate_size=36), 8)
    with pytest.raises(ValueError, match=r"split 2 ways: 49 shared expert columns are not divisible by 2 "):
        check_shardable(config("qwen2_moe", shared_expert_intermediate_size=49), 2)
    check_shardable(config("qwen3_moe", intermediate_size=97, mlp_only_layers=[]), 2)  # every layer sparse
    with pytest.raises(ValueError, match="97 MLP columns"):
        check_shardable(config("qwen3_moe", intermediate_size=97), 2)  # layer 1 dense
    path = write_moe(tmp_path / "odd", "mixtral", intermediate_size=33)
    with pytest.raises(ValueError, match="33 expert columns are not divisible by 2"):
        LLM(path, device="cpu", tp=TensorParallel(0, 2))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_dense_layers_are_transformers(family: str) -> None:
    """decoder_sparse_step and mlp_only_layers pick the same dense layers as transformers' own model."""
    import transformers

    from magicdec.config import ModelConfig

    name, overrides = FAMILIES[family]
    config = getattr(transformers, name)(**{**BASE, **overrides, "num_hidden_layers": 6, "decoder_sparse_step": 2,
                                            "mlp_only_layers": [3]})
    hf = transformers.AutoModelForCausalLM.from_config(config)
    ours = ModelConfig.from_hf(config.to_dict())
    sparse = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert sparse == [ours.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_the_cost_models_expert_count_is_what_the_engine_reads(checkpoints: dict[str, Path]) -> None:
    """Over a serving trace (plain and self-speculative decoding, batches of 1–4 with γ up to 4), the distinct
    experts each forward ran match the cost model's expectation U(n) = Σ_e 1 − (1 − p_e)^n for its n tokens
    (p_e measured over the trace) within 10% on average, where the model does not simply expect every expert;
    the uniform-routing formula is the other estimate, printed."""
    from magicdec.costmodel.experts import Routing, expected_active_experts
    from magicdec.model.moe import track_expert_reads

    llm = LLM(checkpoints["qwen3_moe"], device="cpu")
    modules = track_expert_reads(llm.model)
    prompts = random_prompts(4, [40, 25, 60, 33], 384, seed=11)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for batch in (1, 4):
        llm.generate(prompts[:batch], params)
        for gamma in (2, 4):
            llm.generate(prompts[:batch], params, SpecConfig(method="self", budget=32, sinks=4, gamma=gamma))
    cfg = llm.config
    for layer, m in enumerate(modules):
        assert m.reads is not None
        routing = Routing.from_counts(m.picks, cfg.n_experts_per_token)
        informative = [(n, got) for n, got in m.reads if expected_active_experts(cfg, n, routing) < 0.95 * 8]
        assert len({n for n, _ in informative}) >= 3  # decode steps and verifications of several widths
        got = sum(g for _, g in informative)
        measured = sum(expected_active_experts(cfg, n, routing) for n, _ in informative)
        uniform = sum(expected_active_experts(cfg, n) for n, _ in informative)
        print(f"MoE layer {layer}: {len(informative)} forwards, experts read {got}, expected {measured:.1f} "
              f"(measured routing) / {uniform:.1f} (uniform)")
        assert abs(measured - got) <= 0.10 * got, (got, measured, uniform)
    track_expert_reads(llm.model, on=False)
