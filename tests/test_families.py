"""The model families of issue 25 — Qwen3, Qwen2/Mistral with sliding windows, Ministral's interleaved windows,
Gemma 2, Gemma 3, Phi-3 (LongRoPE, partial rotary), OLMo 2, Granite, SmolLM3 — as tiny random checkpoints saved
by transformers' own config classes: magicdec's greedy output is transformers', prompts past the window included,
and speculation gives plain decoding's tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import check_self_draft_is_plain, gguf_writer, hf_greedy, random_prompts, save_sharp, spawn_ranks
from magicdec import LLM, DraftTuning, SamplingParams, SpecConfig
from magicdec.config import RopeScaling
from magicdec.parallel.tp import TensorParallel

WINDOW = 32
BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
MIXED = ["sliding_attention", "full_attention"]
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [1.5, 2.5, 4.0, 6.0],
            "original_max_position_embeddings": 64}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("Qwen3Config", {}),
    "qwen2_sliding": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "mistral_sliding": ("MistralConfig", {"sliding_window": WINDOW}),
    "ministral": ("MinistralConfig", {"sliding_window": WINDOW, "layer_types": MIXED}),
    "gemma2": ("Gemma2Config", {"sliding_window": WINDOW, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                                "final_logit_softcapping": 8.0}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": WINDOW, "layer_types": MIXED, "query_pre_attn_scalar": 24,
                                    "rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 10000.0},
                                                        "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 1000000.0}}}),
    "phi3": ("Phi3Config", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 3.0, "residual_multiplier": 0.6, "logits_scaling": 2.0,
                                  "attention_multiplier": 0.3}),
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 0]}),
}


def write_family(path: Path, family: str, seed: int = 0, **changes: Any) -> Path:
    """A random model of the family's transformers config class, saved with `save_pretrained`; weights are large
    (N(0, 0.12)) so that greedy tokens vary and ties are rare."""
    import transformers

    name, overrides = FAMILIES[family]
    config = getattr(transformers, name)(**{**BASE, **overrides, **changes})
    return save_sharp(config, path, seed, (-0.2, 0.2) if family.startswith("gemma") else (0.8, 1.2))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: write_family(root / f, f) for f in FAMILIES}


PROMPTS = random_prompts(3, [90, 23, 50], 384, seed=7)  # the first past the window (32), and past Phi-3's 64


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers(family: str, checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    path = checkpoints[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = LLM(path, device="cpu")
    result = ours.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, result.outputs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), (family, len(prompt))


SELF_DRAFTS = {
    "streaming": dict(drafter="streaming", budget=24, sinks=4),
    "streaming-own-kv": dict(drafter="streaming", budget=24, sinks=4, tuning=DraftTuning(kv_source="own")),
    "snapkv": dict(drafter="snapkv", budget=24, tuning=DraftTuning(snapkv_window=8, observe=8)),
    "guided": dict(drafter="guided", budget=192),
    "guided-sum": dict(drafter="guided", budget=192, tuning=DraftTuning(guided_scores="sum")),
}


@pytest.mark.parametrize("drafter", sorted(SELF_DRAFTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_self_speculation_equals_plain_decoding(family: str, drafter: str, checkpoints: dict[str, Path]) -> None:
    """Sliding layers are read as the target reads them, the global ones sparsely; full draft weights or int8
    (alternating by family, so that each drafter meets both)."""
    weights = ("full", "int8")[(sorted(FAMILIES).index(family) + sorted(SELF_DRAFTS).index(drafter)) % 2]
    check_self_draft_is_plain(LLM(checkpoints[family], device="cpu"), SELF_DRAFTS[drafter], weights, 20)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_served_greedy_equals_transformers(family: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """`magicdec serve` on the checkpoint (self-speculation on): the completions of token-id prompts, one past
    the window, are transformers' greedy tokens."""
    from test_server import ENGINE, started
    from transformers import AutoModelForCausalLM

    path = checkpoints[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = LLM(path, device="cpu").tokenizer
    args = ["--model", str(path), *ENGINE, "--spec", "self", "--budget", "24", "--sinks", "4", "--gamma", "2"]
    for server in started(tmp_path, family, args):
        for prompt in PROMPTS:
            body = {"model": server_model(server), "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == tokenizer.decode(hf_greedy(hf, prompt, 12)), (family, len(prompt))


def server_model(server: Any) -> str:
    return httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]


def tp_generate_worker(rank: int, world: int, path: str, result: str) -> None:
    llm = LLM(path, device="cpu", tp=TensorParallel(rank, world))
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    if rank == 0:
        Path(result).write_text(json.dumps([o.token_ids for o in out.outputs]))


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "olmo2"])
def test_two_gloo_ranks_give_one_process_tokens(family: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Tensor parallelism splits the q/k norms (per head: whole on each rank; OLMo 2's over all heads: split,
    their sums of squares all-reduced), the sandwich norms and the windows right."""
    path = checkpoints[family]
    spawn_ranks(tp_generate_worker, 2, str(path), str(tmp_path / "tokens.json"))
    one = LLM(path, device="cpu").generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert json.loads((tmp_path / "tokens.json").read_text()) == [o.token_ids for o in one.outputs]


@pytest.mark.parametrize("drafter", ["streaming", "guided-int8"])
def test_speculative_sampling_on_a_mixed_model_keeps_the_target_distribution(drafter: str, tmp_path: Path,
                                                                             threads: None) -> None:
    """χ² of 3 sampled tokens against the exact joint distribution, on a Gemma-3-like model (a sliding layer of
    window 16 and a global one) with a 40-token prompt: the draft reads the sliding layer as the target does."""
    from test_spec_sampling import VOCAB, engine_chi2


    torch.set_num_threads(1)
    path = write_family(tmp_path / "gemma3", "gemma3", seed=5, vocab_size=VOCAB, sliding_window=16)
    llm = LLM(path, device="cpu")
    assert llm.config.layer_windows == (16, 0)
    spec = SpecConfig(method="self", gamma=2, **(
        dict(drafter="streaming", budget=8, sinks=2) if drafter == "streaming"
        else dict(drafter="guided", budget=128, draft_weights="int8", tuning=DraftTuning(snapkv_window=2))))
    pvalues, rate = engine_chi2(llm, spec)
    assert rate is not None and 0.05 <= rate <= 0.99
    assert min(pvalues.values()) > 1e-3, pvalues


def test_cost_model_counts_kv_reads_per_layer_type() -> None:
    """On Gemma-3-27B (1 global : 5 sliding layers of 1024) a step at 32K reads about a sixth of the KV that the
    same shape with every layer global reads, and a sparse draft only saves on the global layers."""
    from magicdec.costmodel.hardware import load_profile
    from magicdec.costmodel.shapes import resolve_model
    from magicdec.costmodel.steps import CostModel, DraftSpec

    gemma = resolve_model("gemma-3-27b")
    assert gemma.n_global_layers == 10 and gemma.layer_windows[5] == 0 and gemma.layer_windows[0] == 1024
    dense = gemma.with_(layer_types=(), sliding_window=None)
    hw = load_profile("h100")
    mixed_cost = CostModel(gemma, hw, DraftSpec("self", 512))
    dense_cost = CostModel(dense, hw, DraftSpec("self", 512))
    reads = lambda step: {op.name: op.bytes for op in step.ops}["attention"]  # noqa: E731
    mixed, full = reads(mixed_cost.target_cost(8, 32768)), reads(dense_cost.target_cost(8, 32768))
    assert 0.15 < mixed / full < 0.2
    draft_mixed = reads(mixed_cost.draft_cost(8, 32768))
    # the draft's sliding layers still read their whole window; its global layers 512 tokens
    assert draft_mixed == pytest.approx(full / 62 * (52 * 1024 + 10 * 513) / 32769, rel=1e-2)  # (+ the queries)


@pytest.mark.parametrize("model", ["qwen3-8b", "gemma-3-27b"])
def test_plan_prints_a_table_for_the_new_presets(model: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from magicdec.cli.main import main

    assert main(["plan", "--model", model, "--png", str(tmp_path / "plan.png")]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and out.count("\n") > 20


def write_family_gguf(path: Path, hf_dir: Path, arch: str) -> Path:
    """The float32 GGUF llama.cpp's converter writes for a checkpoint of the family: its metadata keys and tensor
    names, Gemma's norms with the one added, Granite's q/k rows permuted (its Llama rule), Phi-3's fused
    projections and LongRoPE factors as tensors, Gemma 3's layer pattern as a per-layer list."""
    import gguf
    import numpy as np

    from magicdec.loading.gguf_file import _FUSED_NAMES, _GLOBAL_NAMES, _LAYER_NAMES, _NORM_NAMES

    w, cfg, t = gguf_writer(path, hf_dir, arch)
    norms = {"gemma2": "sandwich", "gemma3": "sandwich", "olmo2": "post"}.get(arch, "pre")
    names = {**_GLOBAL_NAMES, **_LAYER_NAMES, **_NORM_NAMES[norms], **(_FUSED_NAMES if arch == "phi3" else {})}
    rope = cfg["rope_parameters"]
    if arch == "gemma3":
        rope = rope["full_attention"]
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    w.add_rope_freq_base(rope["rope_theta"])
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg["sliding_window"])
        w.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)  # not llama.cpp's rule (head_dim) here
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch == "granite":
        w.add_attention_scale(cfg["attention_multiplier"])
        w.add_embedding_scale(cfg["embedding_multiplier"])
        w.add_residual_scale(cfg["residual_multiplier"])
        w.add_logit_scale(cfg["logits_scaling"])
    if arch == "phi3":
        original = cfg["original_max_position_embeddings"]
        w.add_rope_dimension_count(int(cfg["head_dim"] * rope["partial_rotary_factor"]))
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(
            (1 + math.log(cfg["max_position_embeddings"] / original) / math.log(original)) ** 0.5)
        w.add_sliding_window(0)
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    for name, tensor in t.items():
        short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        gg = names[short] if not name.startswith("model.layers.") else f"blk.{name.split('.')[2]}.{names[short]}"
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            tensor = tensor + 1
        if arch in ("granite", "smollm3") and short in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = cfg["num_attention_heads" if ".q_proj." in short else "num_key_value_heads"]
            tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        w.add_tensor(gg, tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_ARCHS = [("qwen3", "qwen3"), ("gemma3", "gemma3"), ("gemma2", "gemma2"), ("olmo2", "olmo2"),
              ("granite", "granite"), ("phi3", "phi3"), ("smollm3", "smollm3")]
FLOAT32_FIELDS = ("rms_norm_eps", "attn_scale", "embed_scale", "residual_scale", "logits_scale", "attn_softcap",
                  "final_softcap")


@pytest.mark.parametrize(("family", "arch"), GGUF_ARCHS)
def test_gguf_of_the_family_loads_like_its_checkpoint(family: str, arch: str, checkpoints: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """The GGUF's description and weights are the Hugging Face checkpoint's (which decodes like transformers)."""
    from magicdec.loading import load_model
    from magicdec.loading.gguf_file import load_gguf

    hf_dir = checkpoints[family]
    if family == "smollm3":  # llama.cpp's rule: every 4th layer without RoPE
        hf_dir = write_family(tmp_path / "smollm3-4", "smollm3", num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])
    path = write_family_gguf(tmp_path / f"{family}.gguf", hf_dir, arch)
    ref = load_model(hf_dir, device="cpu")
    for limit in (1 << 30, 0):  # converted once to safetensors, or dequantized at load
        ours, cfg = load_gguf(path, torch.float32, "cpu", tmp_path / f"conv{limit}", cache_limit_bytes=limit)
        for key in FLOAT32_FIELDS:  # float32 in the GGUF
            assert getattr(cfg, key) == pytest.approx(getattr(ref.config, key)), key
        rs, ref_rs = cfg.rope_scaling, ref.config.rope_scaling
        assert (rs.rope_type, rs.factor) == (ref_rs.rope_type, ref_rs.factor)
        if rs.rope_type == "longrope":  # (the context past which the long factors apply)
            assert rs.original_max_position_embeddings == ref_rs.original_max_position_embeddings
        assert rs.short_factor == pytest.approx(ref_rs.short_factor) and rs.long_factor == pytest.approx(
            ref_rs.long_factor)
        assert rs.attention_scaling == pytest.approx(ref_rs.attention_scaling)
        same = dict(name="", eos_token_ids=(), bos_token_id=None, rope_scaling=RopeScaling(),
                    **{key: 0.0 for key in FLOAT32_FIELDS})
        assert cfg.with_(**same) == ref.config.with_(**same)
        theirs = ref.model.state_dict()
        for name, p in ours.state_dict().items():
            assert torch.allclose(p, theirs[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("family", ["gemma2", "ministral", "qwen2_sliding"])
def test_chunked_prefill_past_the_window_equals_transformers(family: str, checkpoints: dict[str, Path]) -> None:
    """Prompts prefilled in chunks of 20 tokens (smaller than the window of 32): each chunk's sliding layers see
    the previous chunks' keys inside the window only."""
    from transformers import AutoModelForCausalLM

    path = checkpoints[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = LLM(path, device="cpu", prefill_chunk=20)
    result = ours.generate(PROMPTS, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for prompt, out in zip(PROMPTS, result.outputs):
        assert out.token_ids == hf_greedy(hf, prompt, 8), (family, len(prompt))
