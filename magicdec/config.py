"""Model shape: the one description of a LLaMA-family decoder that every module reads.

`ModelConfig` is built from a Hugging Face `config.json` dict, from GGUF metadata, or by hand
(tests, the cost model's table of known shapes). It asserts its own invariants so that a bad
checkpoint fails here, with the field named, rather than deep inside a matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """A checkpoint's configuration that this library cannot run, with the reason and the fix."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling as real checkpoints use it.

    - ``default``: no scaling.
    - ``linear``: positions divided by ``factor`` (e.g. Llama-2-7B-32K, factor 8).
    - ``llama3``: the frequency-dependent interpolation of Llama-3.1/3.2.
    - ``yarn``: YaRN (arXiv 2309.00071): dimensions rotating fewer than ``beta_slow`` times over the
      original context are interpolated by ``factor``, those rotating more than ``beta_fast`` times are
      kept, a linear ramp in between; cos and sin are multiplied by ``attention_scaling``.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] = ()  # explicit per-pair divisors (GGUF `rope_freqs`), if given
    beta_fast: float = 32.0  # yarn: rotations above which a dimension is extrapolated (kept)
    beta_slow: float = 1.0  # yarn: rotations below which a dimension is interpolated
    attention_factor: float | None = None  # yarn: cos/sin multiplier; None: 0.1·ln(factor) + 1
    truncate: bool = True  # yarn: round the ramp's bounds outwards to whole dimensions

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling factor must be positive, got {self.factor}")

    @property
    def attention_scaling(self) -> float:
        """The factor transformers multiplies cos and sin by (so q·k by its square): YaRN's, else 1."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return yarn_mscale(self.factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1·mscale·ln(factor) + 1 (1 for factor ≤ 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2, ...)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // n_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama's attention_bias=True)
    o_proj_bias: bool = False  # output projection bias too (Llama's attention_bias=True, not Qwen2)
    sliding_window: int | None = None  # Mistral v0.1; refused for contexts beyond it
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.n_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} (GQA groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.o_proj_bias and not self.attention_bias:
            raise ConfigError("an o_proj bias without q/k/v biases is no supported architecture's layout")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV head (g): 1 for MHA, n_heads for MQA."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_proj_bias:
            attn += d
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return self.n_layers * per_layer + v * d + head + d

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.num_parameters() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int, kv_heads: int | None = None) -> int:
        """Bytes of K and V for one token over all layers (`kv_heads`: those one device holds; default all)."""
        return 2 * self.n_layers * (kv_heads or self.n_kv_heads) * self.head_dim * dtype_bytes

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; refuses architectures we cannot run."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        known_types = set(SUPPORTED_ARCHITECTURES.values())
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); magicdec runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if not archs and model_type not in known_types:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; magicdec runs {', '.join(sorted(known_types))}"
            )
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in cfg
        ]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {cfg['hidden_act']!r}; only SwiGLU (silu) is supported")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias=True is not supported")
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        # transformers: Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias puts a
        # bias on all four projections; Mistral has none
        family = model_type if model_type in known_types else next(SUPPORTED_ARCHITECTURES[a] for a in archs
                                                                   if a in SUPPORTED_ARCHITECTURES)
        qkv_bias = family == "qwen2" or (family == "llama" and bool(cfg.get("attention_bias", False)))
        window = cfg.get("sliding_window")
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(_rope_theta(cfg)),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=qkv_bias and family == "llama",
            sliding_window=int(window) if window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name or cfg.get("_name_or_path", "") or model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``config.json`` dict (used to build test oracles)."""
        qwen2 = self.attention_bias and not self.o_proj_bias  # q/k/v biases only: Qwen2's layout
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "_name_or_path": self.name,
        }
        if not qwen2:
            out["attention_bias"] = self.attention_bias
        rs = self.rope_scaling
        if rs.rope_type != "default":
            scaling: dict[str, Any] = {"rope_type": rs.rope_type, "factor": rs.factor}
            if rs.rope_type in ("llama3", "yarn"):
                scaling["original_max_position_embeddings"] = rs.original_max_position_embeddings
            if rs.rope_type == "llama3":
                scaling.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
            if rs.rope_type == "yarn":
                scaling.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate,
                               attention_factor=rs.attention_scaling)
            out["rope_scaling"] = scaling
        if rs.freq_factors:  # no Hugging Face field for explicit factors: our own key
            out["magicdec_rope_freq_factors"] = list(rs.freq_factors)
        return out


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return params.get("rope_theta", cfg.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict[str, Any]) -> RopeScaling:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = rs.get("rope_type", rs.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}. "
            "Checkpoints using dynamic NTK or LongRoPE are not supported yet."
        )
    if cfg.get("magicdec_rope_freq_factors"):
        return RopeScaling(rope_type, freq_factors=tuple(cfg["magicdec_rope_freq_factors"]))
    if rope_type == "default":
        return RopeScaling()
    # as transformers: a top-level original_max_position_embeddings wins, else the context length
    original = int(cfg.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings", 8192))
    factor = rs.get("factor")
    if factor is None and rope_type == "yarn":  # transformers: the ratio of the two context lengths
        factor = cfg.get("max_position_embeddings", original) / original
    common = dict(rope_type=rope_type, factor=float(1.0 if factor is None else factor),
                  original_max_position_embeddings=original)
    if rope_type == "yarn":
        return RopeScaling(**common, **_yarn_parameters(rs, common["factor"]))
    return RopeScaling(
        **common,
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
    )


def _yarn_parameters(rs: dict[str, Any], factor: float) -> dict[str, Any]:
    """YaRN's ramp bounds and attention factor from a rope_scaling dict, with transformers' defaults:
    an explicit attention_factor, else mscale / mscale_all_dim when both are given, else 0.1·ln(factor) + 1."""
    attention = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim:
        attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return dict(
        beta_fast=float(rs.get("beta_fast") or 32.0),
        beta_slow=float(rs.get("beta_slow") or 1.0),
        attention_factor=None if attention is None else float(attention),
        truncate=bool(rs.get("truncate", True)),
    )

