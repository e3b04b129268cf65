"""Loaders: Hugging Face directories (single and sharded safetensors), GGUF files, and the errors
a user meets with a bad checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config, write_checkpoint
from magicdec import LLM, LoadError, load_model
from magicdec.loading.gguf_file import _unpermute


def test_sharded_safetensors_load_like_a_single_file(tiny_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_dir, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = load_model(tiny_dir, device="cpu").model, load_model(sharded, device="cpu").model
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_gguf_permutation_is_undone() -> None:
    # llama.cpp's converter: w.reshape(h, 2, d/h/2, ...).swapaxes(1, 2)
    hf = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    gg = hf.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)
    assert np.array_equal(_unpermute(gg, 2), hf)


def test_gguf_file_loads_like_its_hf_original(tiny_dir: Path, tmp_path: Path) -> None:
    import gguf

    cfg = tiny_config()
    t = load_file(tiny_dir / "model.safetensors")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_eos_token_id(2)

    def perm(x: torch.Tensor, heads: int) -> np.ndarray:
        a = x.numpy()
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", t["model.norm.weight"].numpy())
    w.add_tensor("output.weight", t["lm_head.weight"].numpy())
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", t[p + hf + ".weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_q.weight", perm(t[p + "self_attn.q_proj.weight"], cfg.n_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", perm(t[p + "self_attn.k_proj.weight"], cfg.n_kv_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from magicdec.loading.gguf_file import load_gguf

    ours, gcfg = load_gguf(path, torch.float32, "cpu", tmp_path / "conv", cache_limit_bytes=1 << 30)
    ref = load_model(tiny_dir, device="cpu").model
    assert gcfg.n_kv_heads == cfg.n_kv_heads and not gcfg.tie_word_embeddings
    for (n, p), (_, q) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    again, _ = load_gguf(path, torch.float32, "cpu", tmp_path / "conv", cache_limit_bytes=1 << 30)  # from cache
    assert torch.equal(again.layers[1].attn.wqkv.weight, ref.layers[1].attn.wqkv.weight)


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nowhere.gguf")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "gpt2"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_model(d)


def test_unsupported_rope_scaling_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "yarn"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unsupported rope_scaling type 'yarn'"):
        load_model(d)


def test_mismatched_shapes_are_named(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "bad", tiny_config())
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"gate_proj.weight' has shape \[160, 64\].*\[128, 64\]"):
        load_model(d)


def test_missing_tensor_and_pickle_weights(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "partial"
    shutil.copytree(tiny_dir, d)
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(LoadError, match="model.layers.1.mlp.up_proj.weight' is missing"):
        load_model(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LoadError, match="pickle weights"):
        load_model(d)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(LoadError, match="not a readable GGUF file"):
        load_model(bad)


def test_builtin_model_and_its_tokenizer(smol: LLM) -> None:
    cfg = smol.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192
    assert smol.tokenizer.decode(smol.tokenizer.encode("Emma Woodhouse, handsome")) == "Emma Woodhouse, handsome"
    chat = smol.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in chat


def test_cli_reports_a_missing_model_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "magicdec", "generate", "--model", str(tmp_path / "m.gguf"),
                           "--prompt", "x"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("magicdec generate: error:") and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
