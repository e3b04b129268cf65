"""GGUF files of GPT-OSS ("gpt-oss") and Qwen2-MoE ("qwen2moe") as llama.cpp's converter writes them: tensor names
from the `gguf` package's own map (what the converter uses), its metadata and layouts (GPT-OSS's gate/up experts
de-interleaved and transposed, with their biases; MXFP4 experts repacked into GGML's blocks; Qwen2-MoE's experts
stacked beside its shared expert and the shared expert's gate). Loaded by magicdec, each file is the tiny random
transformers checkpoint it came from: the same description, every weight equal, transformers' greedy tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_moe import write_moe

from conftest import gguf_writer, hf_greedy, random_prompts
from magicdec import LLM, SamplingParams
from magicdec.config import ModelConfig
from magicdec.loading import LoadedModel, LoadError, Tokenizer, load_model
from magicdec.loading.gguf_file import load_gguf

ARCHS = {"gpt_oss": "gpt-oss", "qwen2_moe": "qwen2moe"}
# GPT-OSS's own RoPE (YaRN ×32 over 4096 positions, the ramp's bounds not rounded: truncate=False)
GPT_OSS_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}
PROMPTS = random_prompts(2, [70, 23], 384, seed=9)  # the first past GPT-OSS's window (32)


def write_hf(path: Path, family: str) -> Path:
    if family == "gpt_oss":
        return write_moe(path, family, rope_parameters=GPT_OSS_ROPE, max_position_embeddings=131072)
    return write_moe(path, family)


def write_llama_cpp_gguf(path: Path, hf_dir: Path, family: str, fused: bool = False,
                         experts: dict[str, Any] | None = None, skip: tuple[str, ...] = (),
                         extra: dict[str, np.ndarray] | None = None, meta: dict[str, int] | None = None) -> Path:
    """The GGUF llama.cpp's converter writes for the checkpoint in `hf_dir`: float32 tensors (GPT-OSS's expert
    weights: `experts`, MXFP4 GGUF tensors by name, when given), `fused` gate/up experts (its --fuse-gate-up-exps);
    metadata keys in `skip` left out, `extra` tensors and `meta` keys (uint32, under the architecture) added."""
    import gguf

    arch = ARCHS[family]
    w, cfg, t = gguf_writer(path, hf_dir, arch)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     cfg["num_hidden_layers"])
    rope = cfg["rope_parameters"]
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_expert_count(cfg.get("num_experts") or cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if family == "gpt_oss":
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
        if "sliding_window" not in skip:
            w.add_sliding_window(cfg["sliding_window"])
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    else:  # (files of older converters lack the sizes: the tensors have them)
        if "expert_feed_forward_length" not in skip:
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if "expert_shared_feed_forward_length" not in skip:
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    for key, value in (meta or {}).items():
        w.add_uint32(f"{arch}.{key}", value)

    def add(hf_name: str, tensor: torch.Tensor | np.ndarray) -> None:
        gg = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gg is not None, hf_name
        w.add_tensor(gg, tensor.numpy() if isinstance(tensor, torch.Tensor) else tensor)

    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for name, x in t.items():
        p, _, short = name.partition("mlp.experts.")
        if family == "gpt_oss" and short:  # [E, d, 2f] gate/up interleaved, [E, f, d] down → [E, out, in] each
            kind = "bias" if short.endswith("_bias") else "weight"
            short = short.removesuffix("_bias")
            if kind == "weight":
                x = x.transpose(1, 2)
            if short == "down_proj":
                if kind == "bias" or experts is None:
                    add(f"{p}mlp.experts.down_proj.{kind}", x)
                continue
            gate, up = x[:, ::2], x[:, 1::2]
            if fused:
                gg = names.get_name(f"{p}mlp.experts.gate_proj.{kind}", try_suffixes=(f".{kind}",))
                w.add_tensor(gg.replace("gate_exps", "gate_up_exps"), torch.cat([gate, up], dim=1).numpy())
            elif kind == "bias" or experts is None:
                add(f"{p}mlp.experts.gate_proj.{kind}", gate.contiguous())
                add(f"{p}mlp.experts.up_proj.{kind}", up.contiguous())
        elif short:  # Qwen2-MoE's experts one by one: stacked per projection, [E, out, in]
            e, _, proj = short.partition(".")
            stacked.setdefault(f"{p}mlp.experts.{proj}", {})[int(e)] = x
        elif name.endswith("self_attn.sinks"):
            add(name + ".weight", x)  # (the converter's rule for GPT-OSS's sinks)
        else:
            add(name, x)
    for name, xs in stacked.items():
        add(name, torch.stack([xs[e] for e in sorted(xs)]))
    for name, raw in (experts or {}).items():
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def check_like_checkpoint(path: Path, hf_dir: Path, tmp_path: Path) -> None:
    """The GGUF's description and weights are the checkpoint's (float32 metadata aside), converted once or
    dequantized at load; its greedy tokens are transformers' on the checkpoint."""
    from transformers import AutoModelForCausalLM

    ref = load_model(hf_dir, device="cpu")
    for limit in (1 << 30, 0):  # converted once to safetensors, or dequantized at load
        ours, cfg = load_gguf(path, torch.float32, "cpu", tmp_path / f"conv{limit}", cache_limit_bytes=limit)
        assert cfg.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps)
        same = dict(name="", eos_token_ids=(), bos_token_id=None, rms_norm_eps=0.0)
        assert cfg.with_(**same) == ref.config.with_(**same)
        theirs = ref.model.state_dict()
        assert set(ours.state_dict()) == set(theirs)
        for name, p in ours.state_dict().items():
            assert torch.equal(p, theirs[name]), name
    check_greedy(ours, cfg, path, AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), hf_dir)


def check_greedy(ours: Any, cfg: ModelConfig, path: Path, hf: Any, hf_dir: Path) -> None:
    """The GGUF's model decodes the prompts (one past the window) greedily like transformers' `hf`."""
    llm = LLM(loaded=LoadedModel(ours, Tokenizer.from_dir(hf_dir), cfg, path), device="cpu")
    result = llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, result.outputs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), len(prompt)


SIZES = ("expert_feed_forward_length", "expert_shared_feed_forward_length")


@pytest.mark.parametrize(("family", "fused", "skip"), [("gpt_oss", False, ()), ("gpt_oss", True, ()),
                                                       ("qwen2_moe", False, ()), ("qwen2_moe", False, SIZES)])
def test_gguf_of_a_moe_loads_like_its_checkpoint(family: str, fused: bool, skip: tuple[str, ...],
                                                 tmp_path: Path) -> None:
    """GPT-OSS: sinks, q/k/v/o biases, the router's bias, gate/up/down experts with their biases (separate or fused
    gate/up), sliding layers alternating with full ones (the window from the metadata), YaRN without rounding,
    the clamped SwiGLU. Qwen2-MoE: experts of their own size beside a shared expert of another (from the metadata,
    or the tensors' shapes), and its gate."""
    hf_dir = write_hf(tmp_path / "hf", family)
    path = write_llama_cpp_gguf(tmp_path / f"{family}.gguf", hf_dir, family, fused=fused, skip=skip)
    cfg = load_model(hf_dir, device="cpu").config  # (what the checkpoint, hence the file, has to carry)
    if family == "gpt_oss":
        assert cfg.layer_types == ("sliding", "full") and cfg.rope_scaling.rope_type == "yarn"
        assert not cfg.rope_scaling.truncate and cfg.attn_sinks and cfg.swiglu_limit == 7.0
    else:
        assert (cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.shared_expert_gate) == (32, 48, 1)
    check_like_checkpoint(path, hf_dir, tmp_path)


def to_ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """transformers' MXFP4 ([..., groups, 16] codes, value 2i in byte i's low nibble and 2i + 1 in its high one;
    [..., groups] exponents) as GGML's blocks: the exponent byte, then 16 bytes holding values j and j + 16."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., groups, 32] in value order
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat([scales[..., None], packed], dim=-1).flatten(-2).numpy()  # [..., groups · 17]


def test_mxfp4_experts_are_dequantized_like_transformers(tmp_path: Path) -> None:
    """llama.cpp's GPT-OSS files keep the published MXFP4 experts (GGML type MXFP4, repacked from the checkpoint's
    blocks and scales): the `gguf` package's dequantization of them is transformers' own (Mxfp4Config(dequantize=
    True)) of the checkpoint, weight for weight, and the greedy tokens are its."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    hf_dir = write_hf(tmp_path / "hf", "gpt_oss")
    gen = torch.Generator().manual_seed(1)
    tensors, raw = {}, {}
    for name, x in load_file(hf_dir / "model.safetensors").items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = x
            continue
        e, rows, cols = x.shape  # [E, in, out]: MXFP4 holds [E, out, in/32, 16]
        blocks = torch.randint(0, 256, (e, cols, rows // 32, 16), dtype=torch.uint8, generator=gen)
        scales = torch.randint(123, 128, (e, cols, rows // 32), dtype=torch.uint8, generator=gen)
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        layer = name.split(".")[2]
        if name.endswith("down_proj"):
            raw[f"blk.{layer}.ffn_down_exps.weight"] = to_ggml_mxfp4(blocks, scales)
        else:  # gate rows interleaved with up rows
            raw[f"blk.{layer}.ffn_gate_exps.weight"] = to_ggml_mxfp4(blocks[:, ::2], scales[:, ::2])
            raw[f"blk.{layer}.ffn_up_exps.weight"] = to_ggml_mxfp4(blocks[:, 1::2], scales[:, 1::2])
    path = write_llama_cpp_gguf(tmp_path / "mxfp4.gguf", hf_dir, "gpt_oss", experts=raw)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                              quantization_config=Mxfp4Config(dequantize=True)).eval()
    ours, ours_cfg = load_gguf(path, torch.float32, "cpu", tmp_path / "conv", cache_limit_bytes=0)
    for i, layer in enumerate(hf.model.layers):
        gu, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
        for e, expert in enumerate(ours.layers[i].mlp.experts):
            assert torch.equal(expert.w_gate_up.weight, torch.cat([gu[e, :, ::2].T, gu[e, :, 1::2].T])), (i, e)
            assert torch.equal(expert.w_down.weight, down[e].T), (i, e)
    check_greedy(ours, ours_cfg, path, hf, hf_dir)


def test_unreadable_variants_are_named(tmp_path: Path) -> None:
    """A GPT-OSS file without its window, router biases in a Qwen2-MoE file or a sigmoid router, a tensor type the
    `gguf` package cannot dequantize: each refused, naming what is wrong."""
    import gguf

    from magicdec.loading.gguf_file import gguf_tensors, open_gguf

    hf_dir = write_hf(tmp_path / "gpt", "gpt_oss")
    path = write_llama_cpp_gguf(tmp_path / "nowindow.gguf", hf_dir, "gpt_oss", skip=("sliding_window",))
    with pytest.raises(LoadError, match="lacks gpt-oss.attention.sliding_window"):
        load_gguf(path, torch.float32, "cpu", tmp_path / "c1", cache_limit_bytes=0)
    qwen = write_hf(tmp_path / "qwen", "qwen2_moe")
    path = write_llama_cpp_gguf(tmp_path / "bias.gguf", qwen, "qwen2_moe",
                                extra={"blk.0.ffn_gate_inp.bias": np.zeros(4, dtype=np.float32)})
    with pytest.raises(LoadError, match="biases on the router or experts.*drops no weights"):
        load_gguf(path, torch.float32, "cpu", tmp_path / "c2", cache_limit_bytes=0)
    path = write_llama_cpp_gguf(tmp_path / "sigmoid.gguf", qwen, "qwen2_moe", meta={"expert_gating_func": 2})
    with pytest.raises(LoadError, match="sigmoid.gguf: qwen2moe.expert_gating_func is sigmoid"):
        load_gguf(path, torch.float32, "cpu", tmp_path / "c3", cache_limit_bytes=0)
    w, _, _ = gguf_writer(tmp_path / "q81.gguf", qwen, "qwen2moe")
    w.add_tensor("token_embd.weight", np.zeros((384, 80), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = ModelConfig(vocab_size=384, hidden_size=64, intermediate_size=96, n_layers=1, n_heads=4, n_kv_heads=2)
    with pytest.raises(LoadError, match="'token_embd.weight' is stored as Q8_1.*cannot dequantize"):
        gguf_tensors(open_gguf(tmp_path / "q81.gguf"), cfg, tmp_path / "q81.gguf")
