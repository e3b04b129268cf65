"""Loaders: Hugging Face directories (single and sharded safetensors), GGUF files, and the errors
a user meets with a bad checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoints import write_hf_checkpoint

from conftest import full_logits, hf_model, random_prompts, tiny_config, word_vocabulary, write_checkpoint, write_gguf
from magicdec import LLM, LoadError, load_model
from magicdec.config import RopeScaling
from magicdec.loading.gguf_file import _unpermute, load_gguf


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
    cfg = tiny_config()
    path = write_gguf(tmp_path / "tiny.gguf", tiny_dir)
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
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unsupported rope_scaling type 'dynamic'"):
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


# ---- tensors the model does not use ------------------------------------------------------------------
def test_unused_tensor_is_named_and_inv_freq_ignored(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "extra"
    shutil.copytree(tiny_dir, d)
    t = load_file(d / "model.safetensors")
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints: transformers ignores it
    save_file(t, d / "model.safetensors")
    load_model(d, device="cpu")
    t["model.layers.1.self_attn.o_proj.bias"] = torch.ones(64)  # a Llama attention_bias tensor, config says none
    save_file(t, d / "model.safetensors")
    with pytest.raises(LoadError, match=r"does not use tensor 'model\.layers\.1\.self_attn\.o_proj\.bias'"):
        load_model(d, device="cpu")


def test_gguf_attention_output_bias_is_loaded(tmp_path: Path) -> None:
    hf_dir = write_hf_checkpoint(tmp_path / "hf", "llama", {"attention_bias": True})
    path = write_gguf(tmp_path / "bias.gguf", hf_dir)
    ours, cfg = load_gguf(path, torch.float32, "cpu", tmp_path / "conv", cache_limit_bytes=0)  # no cache
    assert cfg.attention_bias and cfg.o_proj_bias
    ids = torch.tensor(random_prompts(1, [30], cfg.vocab_size, seed=3))
    logits = full_logits(ours, ids)
    with torch.inference_mode():
        ref = hf_model(hf_dir)(ids).logits
    assert (logits - ref).abs().max() <= 1e-4


def test_gguf_unknown_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "x.gguf", tiny_dir, extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(LoadError, match="'blk.0.attn_q_norm.weight'"):
        load_gguf(path, torch.float32, "cpu", tmp_path / "conv", cache_limit_bytes=1 << 30)


# ---- RoPE scaling in GGUF files ----------------------------------------------------------------------
def test_gguf_yarn_scaling_equals_transformers(tmp_path: Path) -> None:
    rope = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
            "beta_slow": 2.0, "attention_factor": 1.25, "rope_theta": 10000.0}
    hf_dir = write_hf_checkpoint(tmp_path / "hf", "llama", {"rope_parameters": rope, "max_position_embeddings": 512})
    gguf_rope = {"scaling.type": "yarn", "scaling.factor": 8.0, "scaling.original_context_length": 64,
                 "scaling.yarn_beta_fast": 16.0, "scaling.yarn_beta_slow": 2.0, "scaling.yarn_attn_factor": 1.25}
    path = write_gguf(tmp_path / "yarn.gguf", hf_dir, rope=gguf_rope)
    ours, cfg = load_gguf(path, torch.float32, "cpu", tmp_path / "conv", cache_limit_bytes=1 << 30)
    assert cfg.rope_scaling == RopeScaling("yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=16.0,
                                           beta_slow=2.0, attention_factor=1.25)
    ids = torch.tensor(random_prompts(1, [120], cfg.vocab_size, seed=3))
    logits = full_logits(ours, ids)
    with torch.inference_mode():
        ref = hf_model(hf_dir)(ids).logits
    assert (logits - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("rope", [{"scaling.type": "longrope", "scaling.factor": 4.0},
                                  {"scaling.type": "yarn", "scaling.factor": 4.0, "scaling.yarn_ext_factor": 0.5}])
def test_gguf_unsupported_rope_scaling_is_refused(rope: dict[str, Any], tiny_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "x.gguf", tiny_dir, rope=rope)
    with pytest.raises(LoadError, match="x.gguf: .*(RoPE scaling type 'longrope'|yarn_ext_factor)"):
        load_gguf(path, torch.float32, "cpu", tmp_path / "conv", cache_limit_bytes=1 << 30)


# ---- chat prompts ------------------------------------------------------------------------------------
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                   "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize("template", [LLAMA2_TEMPLATE, LLAMA3_TEMPLATE], ids=["llama2_mistral", "llama3"])
def test_chat_encoding_has_one_bos(template: str, tmp_path: Path) -> None:
    """A tokenizer that adds a BOS on encoding (Llama's, Mistral's) and a template that writes one."""
    from tokenizers import AddedToken, processors

    from magicdec.loading.tokenizer import Tokenizer

    tok = word_vocabulary(64)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<|start_header_id|>",
                                                                  "<|end_header_id|>", "<|eot_id|>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 64)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                               "chat_template": template}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    ids = tokenizer.encode_chat([{"role": "user", "content": "w5 w6"}])
    assert ids[0] == 64 and ids.count(64) == 1
    assert ids == tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}]),
                                   add_special_tokens=False)


# ---- the GGUF conversion cache -----------------------------------------------------------------------
def convert(path: Path, cache: Path) -> Any:
    return load_gguf(path, torch.float32, "cpu", cache, cache_limit_bytes=1 << 30)[0]


def test_conversion_is_announced_and_timed(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_dir)
    convert(path, tmp_path / "conv")
    err = capsys.readouterr().err
    assert "converting tiny.gguf to safetensors (once)" in err
    assert re.search(r"converted tiny\.gguf to safetensors in \d+\.\d s", err)
    convert(path, tmp_path / "conv")  # from the cache: silent
    assert capsys.readouterr().err == ""


def test_concurrent_loads_convert_once(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Ranks of one torchrun job load the same GGUF at once: one converts, the others wait for it."""
    from magicdec.loading.conversion import conversion_lock

    path, cache = write_gguf(tmp_path / "tiny.gguf", tiny_dir), tmp_path / "conv"
    models: list[Any] = []
    err = ""
    with conversion_lock(cache):  # another process holds the lock: every loader waits
        threads = [threading.Thread(target=lambda: models.append(convert(path, cache))) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while err.count(f"waiting for process {os.getpid()}") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
        assert not models and not (cache / "model.safetensors").exists()
    for t in threads:
        t.join(timeout=120)
    err += capsys.readouterr().err
    assert len(models) == 3 and err.count("converting tiny.gguf") == 1, err
    assert err.count(f"waiting for process {os.getpid()}") == 3
    assert all(torch.equal(m.layers[0].attn.wqkv.weight, models[0].layers[0].attn.wqkv.weight) for m in models)


def test_lock_of_a_dead_process_is_taken_over(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, cache = write_gguf(tmp_path / "tiny.gguf", tiny_dir), tmp_path / "conv"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "conv.lock").write_text(str(dead.pid))  # it died holding the lock, mid-conversion
    (cache / f"weights.{dead.pid}.tmp").mkdir(parents=True)
    (cache / f"weights.{dead.pid}.tmp" / "model.safetensors").write_bytes(b"half")
    convert(path, cache)
    assert f"process {dead.pid} was converting into {cache} and is gone; taking over" in capsys.readouterr().err
    assert not list(cache.glob("*.tmp"))


def test_interrupted_conversion_leaves_no_tmp(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    path, cache = write_gguf(tmp_path / "tiny.gguf", tiny_dir), tmp_path / "conv"
    real_save = safetensors.torch.save_file

    def interrupted(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(path, cache)
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("model.safetensors"))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    convert(path, cache)


def test_damaged_conversion_cache(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated cached file is converted again; a same-size corrupt one is a one-line error naming what to delete."""
    path, cache = write_gguf(tmp_path / "tiny.gguf", tiny_dir), tmp_path / "conv"
    first = convert(path, cache).lm_head.weight.clone()
    weights = cache / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()  # a new file: the loaded model maps the old one
    weights.write_bytes(data[:1000])
    again = convert(path, cache)
    assert "model.safetensors has 1000 bytes" in capsys.readouterr().err
    assert torch.equal(first, again.lm_head.weight)
    weights.unlink()
    weights.write_bytes(b"\xff" * len(data))
    with pytest.raises(LoadError) as e:
        convert(path, cache)
    assert "\n" not in str(e.value) and str(weights) in str(e.value) and f"delete {cache}" in str(e.value)


def test_damaged_cached_tokenizer_is_converted_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    from magicdec.loading import tokenizer as tokenizer_module

    def fake_conversion(path: Path, dest: Path) -> None:  # transformers' GGUF conversion stands aside
        word_vocabulary(32).save(str(dest / "tokenizer.json"))

    monkeypatch.setattr(tokenizer_module, "_convert_gguf_tokenizer", fake_conversion)
    gguf_path, cache = tmp_path / "m.gguf", tmp_path / "conv"
    assert tokenizer_module.Tokenizer.from_gguf(gguf_path, cache).vocab_size == 32
    tok_file = cache / "tokenizer.json"
    tok_file.write_text(tok_file.read_text()[:100])
    assert tokenizer_module.Tokenizer.from_gguf(gguf_path, cache).vocab_size == 32
    assert "tokenizer.json has 100 bytes" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"garbage" * 50, None], ids=["garbage", "truncated"])
def test_unreadable_safetensors_is_named(content: bytes | None, tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "broken"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(content if content is not None else f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LoadError, match=f"{re.escape(str(f))} is not a readable safetensors file"):
        load_model(d, device="cpu")
