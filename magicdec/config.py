"""Model shape: the one description of a decoder that every module reads, layer by layer (sliding or global
attention, RoPE or none, q/k norms, soft-caps, norm placement, multipliers, experts and their routing, attention
sinks: what the families differ in).

`ModelConfig` is built from a Hugging Face `config.json` dict (each family's fields translated in `from_hf`),
from GGUF metadata, or by hand (tests, the cost model's table of known shapes). It asserts its own invariants
so that a bad checkpoint fails here, with the field named, rather than deep inside a matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MinistralForCausalLM": "ministral",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    "GraniteForCausalLM": "granite",
    "SmolLM3ForCausalLM": "smollm3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "GptOssForCausalLM": "gpt_oss",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
NORM_PLACEMENTS = ("pre", "sandwich", "post")  # Llama: before; Gemma 2/3: before and after; OLMo 2: after
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
ROUTER_SOFTMAX = ("before", "after")  # softmax over all experts then top-k (Mixtral, Qwen, OLMoE), or after (GPT-OSS)


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
    short_factor: tuple[float, ...] = ()  # longrope: per-pair divisors while a row's positions fit the original
    long_factor: tuple[float, ...] = ()  # longrope: per-pair divisors once a row reaches past it

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
        if self.rope_type not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.rope_type == "longrope":  # Phi-3: √(1 + ln(factor) / ln(original context))
            if self.factor <= 1:
                return 1.0
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))
        return yarn_mscale(self.factor)


def layer_groups(windows: tuple[int, ...]) -> list[list[int]] | None:
    """The layers of a model split into groups for sliding-window release: group 0 its global layers, then
    each sliding window's layers in groups of as many (a 1:1 model: one of each; Gemma 3's 52 sliding and 10
    global layers: six sliding groups, the last of 2 layers, its blocks' other slots unused). None where there
    is nothing to gain: no global or no sliding layer, or fewer sliding layers than global ones."""
    glob = [i for i, w in enumerate(windows) if not w]
    if not glob or len(windows) - len(glob) < len(glob):
        return None
    groups = [glob]
    for w in sorted({w for w in windows if w}):
        layers = [i for i, x in enumerate(windows) if x == w]
        groups += [layers[i : i + len(glob)] for i in range(0, len(layers), len(glob))]
    return groups


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1·mscale·ln(factor) + 1 (1 for factor ≤ 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of a decoder (Llama 2/3, Mistral/Ministral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2, Granite,
    SmolLM2/3; the mixtures of experts Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GPT-OSS); the fields after `name`
    default to the Llama decoder."""

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
    sliding_window: int | None = None  # the window of the sliding layers (every layer's without `layer_types`)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # ---- what the families differ in, per layer (defaults: the Llama decoder) -------------------------------
    layer_types: tuple[str, ...] = ()  # "full" / "sliding" per layer; (): all sliding if sliding_window, else full
    rope_local_theta: float = 0.0  # θ of the sliding layers (Gemma 3's rope_local_base_freq; 0: rope_theta)
    rope_local_scaling: RopeScaling | None = None  # their scaling (None: rope_scaling)
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (SmolLM3)
    rotary_dim: int = 0  # dimensions of a head that RoPE rotates (Phi-3's partial rotary; 0: head_dim)
    qk_norm: str = ""  # RMSNorm of q and k before RoPE: "head" (Qwen3, Gemma 3), "full" (OLMo 2), "" none
    attn_scale: float = 0.0  # q·k multiplier (Gemma's query_pre_attn_scalar^-½, Granite's; 0: 1/√head_dim)
    attn_softcap: float = 0.0  # attention logits → cap·tanh(logits/cap) (Gemma 2; 0: none)
    final_softcap: float = 0.0  # the same on the output logits
    embed_scale: float = 1.0  # embeddings multiplied by it (Gemma √hidden_size, Granite's embedding_multiplier)
    residual_scale: float = 1.0  # each sublayer's output multiplied by it (Granite's residual_multiplier)
    logits_scale: float = 1.0  # logits divided by it (Granite's logits_scaling)
    norm_placement: str = "pre"  # see NORM_PLACEMENTS
    hidden_act: str = "silu"  # the gate's activation (GeGLU: gelu_pytorch_tanh)
    family: str = "llama"  # the Hugging Face model_type whose tensor names the checkpoint uses
    # ---- mixture of experts (n_experts 0: every MLP dense) ---------------------------------------------
    n_experts: int = 0  # routed experts of a MoE layer (num_experts / num_local_experts)
    n_experts_per_token: int = 0  # top-k: experts each token is routed to
    moe_intermediate_size: int = 0  # each routed expert's hidden size (0: intermediate_size)
    shared_expert_intermediate_size: int = 0  # an always-on shared expert's hidden size (0: none)
    dense_layers: tuple[int, ...] = ()  # layers whose MLP stays dense in a MoE model (Qwen3-MoE mlp_only_layers)
    expert_weight_bits: float = 0.0  # bits per routed-expert weight as stored (GPT-OSS MXFP4: 4.25; 0: the dtype's)
    router_softmax: str = "before"  # see ROUTER_SOFTMAX
    norm_topk_prob: bool = False  # the top-k weights renormalised to sum to 1 (Mixtral; Qwen-MoE, OLMoE if set)
    router_bias: bool = False  # a bias on the router's logits (GPT-OSS)
    expert_bias: bool = False  # biases on the experts' gate/up and down projections (GPT-OSS)
    swiglu_alpha: float = 0.0  # GPT-OSS's clamped SwiGLU: (clamp(up) + 1)·g·σ(α·g), g = min(gate, limit); 0: SiLU
    swiglu_limit: float = 0.0  # its clamp (gate ≤ limit, |up| ≤ limit)
    shared_expert_gate: bool = False  # the shared expert's output times σ(x·w) (Qwen2-MoE)
    attn_sinks: bool = False  # a learned logit per query head in each softmax's denominator (GPT-OSS)

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
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ConfigError(f"layer_types lists {len(self.layer_types)} layers, the model has {self.n_layers}")
        if any(t not in ("full", "sliding") for t in self.layer_types):
            raise ConfigError(f"layer_types must be 'full' or 'sliding', got {sorted(set(self.layer_types))}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a sliding_window")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary_dim must be even and ≤ head_dim {self.head_dim}, got {self.rotary_dim}")
        for name, allowed in (("qk_norm", ("", "head", "full")), ("norm_placement", NORM_PLACEMENTS),
                              ("hidden_act", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unsupported {name} {getattr(self, name)!r}; supported: {allowed}")

        if self.router_softmax not in ROUTER_SOFTMAX:
            raise ConfigError(f"unsupported router_softmax {self.router_softmax!r}; supported: {ROUTER_SOFTMAX}")
        if self.n_experts and not 0 < self.n_experts_per_token <= self.n_experts:
            raise ConfigError(f"n_experts_per_token must be in 1 … n_experts {self.n_experts}, "
                              f"got {self.n_experts_per_token}")
        if self.expert_weight_bits < 0:
            raise ConfigError(f"expert_weight_bits must be >= 0, got {self.expert_weight_bits}")

    # ---- per layer -----------------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts."""
        return bool(self.n_experts) and layer not in self.dense_layers

    def layer_window(self, layer: int) -> int:
        """The sliding window of `layer` (0: a global layer, which sees the whole context)."""
        if not self.sliding_window:
            return 0
        if not self.layer_types:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding" else 0

    @property
    def layer_windows(self) -> tuple[int, ...]:
        return tuple(self.layer_window(i) for i in range(self.n_layers))

    @property
    def layer_groups(self) -> list[list[int]] | None:
        """Its layers in groups of equal size whose sliding blocks can be released (`layer_groups`), or None."""
        return layer_groups(self.layer_windows)

    @property
    def n_global_layers(self) -> int:
        return sum(1 for w in self.layer_windows if not w)

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling] | None:
        """θ and scaling of `layer`'s RoPE, or None for a layer without positions (NoPE)."""
        if layer in self.nope_layers:
            return None
        if self.layer_window(layer) and (self.rope_local_theta or self.rope_local_scaling is not None):
            return (self.rope_local_theta or self.rope_theta, self.rope_local_scaling or self.rope_scaling)
        return self.rope_theta, self.rope_scaling

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def scale(self) -> float:
        """The attention logits' multiplier."""
        return self.attn_scale or self.head_dim ** -0.5

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

    @property
    def expert_size(self) -> int:
        """A routed expert's hidden size."""
        return self.moe_intermediate_size or self.intermediate_size

    def mlp_parameters(self, layer: int) -> int:
        """Parameters of `layer`'s MLP: dense, or router + every expert (+ the shared expert and its gate)."""
        d = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * d * self.intermediate_size
        f, e = self.expert_size, self.n_experts
        n = e * d + (e if self.router_bias else 0) + e * 3 * d * f + (e * (2 * f + d) if self.expert_bias else 0)
        if self.shared_expert_intermediate_size:
            n += 3 * d * self.shared_expert_intermediate_size + (d if self.shared_expert_gate else 0)
        return n

    def num_parameters(self) -> int:
        d, v = self.hidden_size, self.vocab_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_proj_bias:
            attn += d
        if self.attn_sinks:
            attn += self.n_heads
        if self.qk_norm:
            attn += self.q_size + self.kv_size if self.qk_norm == "full" else 2 * self.head_dim
        norms = (4 if self.norm_placement == "sandwich" else 2) * d
        layers = sum(attn + self.mlp_parameters(i) + norms for i in range(self.n_layers))
        head = 0 if self.tie_word_embeddings else v * d
        return layers + v * d + head + d

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
        if cfg.get("magicdec_config"):  # our own round trip (a converted GGUF): the description as it was
            return _from_own(cfg["magicdec_config"])
        act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias=True is not supported")
        if cfg.get("clip_qkv"):
            raise ConfigError("clip_qkv (OLMoE's clamp of q, k, v) is not supported")
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        # transformers: Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias puts a
        # bias on all four projections; Mistral has none
        family = model_type if model_type in known_types else next(SUPPORTED_ARCHITECTURES[a] for a in archs
                                                                   if a in SUPPORTED_ARCHITECTURES)
        bias = bool(cfg.get("attention_bias", False))
        qkv_bias = (family == "qwen2" or (family == "qwen2_moe" and cfg.get("qkv_bias", True))
                    or (family in BIAS_ON_ALL_FOUR and bias))
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        global_rope = _rope_parameters(cfg, "full_attention")
        local_rope = _rope_parameters(cfg, "sliding_attention") if _per_type(cfg) else None
        rope_theta, rope_scaling = _rope_theta(global_rope), _rope_scaling(cfg, global_rope)
        partial = float(global_rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
        changes: dict[str, Any] = {}
        if local_rope is not None:
            changes.update(rope_local_theta=float(_rope_theta(local_rope)),
                           rope_local_scaling=_rope_scaling(cfg, local_rope))
        elif cfg.get("rope_local_base_freq"):
            changes["rope_local_theta"] = float(cfg["rope_local_base_freq"])
        changes.update(FAMILY_TRAITS.get(family, {}))
        if family in ("gemma2", "gemma3_text"):
            changes.update(embed_scale=cfg["hidden_size"] ** 0.5,
                           attn_scale=float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5)
        if family == "granite":
            changes.update(embed_scale=float(cfg.get("embedding_multiplier", 1.0)),
                           residual_scale=float(cfg.get("residual_multiplier", 1.0)),
                           logits_scale=float(cfg.get("logits_scaling", 1.0)),
                           attn_scale=float(cfg.get("attention_multiplier") or head_dim ** -0.5))
        if cfg.get("no_rope_layers"):  # SmolLM3: 1 = RoPE, 0 = none
            changes["nope_layers"] = tuple(i for i, use in enumerate(cfg["no_rope_layers"]) if not use)
        changes.update(_experts(cfg, family))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family in ("gemma2", "gemma3_text"))),
            attention_bias=qkv_bias,
            o_proj_bias=qkv_bias and family not in ("qwen2", "qwen2_moe"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name or cfg.get("_name_or_path", "") or model_type,
            rotary_dim=int(head_dim * partial) if partial < 1 else 0,
            attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
            hidden_act=act,
            family=family,
            **_windows(cfg, family),
            **changes,
        )

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``config.json`` dict (used to build test oracles); a description past
        the Llama shape (another family's) carries itself whole under `magicdec_config`."""
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
        if self.family not in ("llama", "qwen2", "mistral") or self.layer_types:
            out["magicdec_config"] = _to_own(self)
        return out


def _to_own(cfg: ModelConfig) -> dict[str, Any]:
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for key in ("rope_scaling", "rope_local_scaling"):
        if out[key] is not None:
            out[key] = {f.name: getattr(out[key], f.name) for f in fields(out[key])}
    return out


def _from_own(own: dict[str, Any]) -> ModelConfig:
    own = dict(own)
    for key in ("rope_scaling", "rope_local_scaling"):
        if own.get(key) is not None:
            own[key] = RopeScaling(**{k: tuple(v) if isinstance(v, list) else v for k, v in own[key].items()})
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in own.items()})


# what a family's decoder always has, whatever its config says (HF config.json or GGUF metadata)
FAMILY_TRAITS: dict[str, dict[str, Any]] = {
    "qwen3": {"qk_norm": "head"},
    "gemma3_text": {"qk_norm": "head", "norm_placement": "sandwich"},
    "gemma2": {"norm_placement": "sandwich"},
    "olmo2": {"qk_norm": "full", "norm_placement": "post"},
    "qwen3_moe": {"qk_norm": "head"},
    "olmoe": {"qk_norm": "full"},
    "mixtral": {"norm_topk_prob": True},
    "gpt_oss": {"router_softmax": "after", "router_bias": True, "expert_bias": True, "attn_sinks": True},
}
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")

# families whose attention_bias puts a bias on q, k, v and o (Qwen2 has q/k/v biases only, always)
BIAS_ON_ALL_FOUR = ("llama", "qwen3", "olmo2", "granite", "smollm3", "gemma2", "gemma3_text", "qwen3_moe", "olmoe",
                    "gpt_oss")


def _experts(cfg: dict[str, Any], family: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a MoE family's config: expert counts and sizes, which layers stay
    dense (Qwen-MoE's mlp_only_layers and decoder_sparse_step), the top-k renormalisation, GPT-OSS's SwiGLU."""
    if family not in MOE_FAMILIES:
        return {}
    n = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    k = int(cfg.get("num_experts_per_tok") or 0)
    if not n or not k:
        raise ConfigError(f"a {family} config needs num_experts (or num_local_experts) and num_experts_per_tok")
    out: dict[str, Any] = {"n_experts": n, "n_experts_per_token": k}
    if family in ("qwen3_moe", "qwen2_moe"):
        step = int(cfg.get("decoder_sparse_step") or 1)
        only = set(cfg.get("mlp_only_layers") or ())
        out.update(moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
                   dense_layers=tuple(i for i in range(cfg["num_hidden_layers"])
                                      if i in only or (i + 1) % step))
    if family in ("qwen3_moe", "qwen2_moe", "olmoe"):
        out["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    if family == "qwen2_moe" and cfg.get("shared_expert_intermediate_size"):
        out.update(shared_expert_intermediate_size=int(cfg["shared_expert_intermediate_size"]),
                   shared_expert_gate=True)
    if family == "gpt_oss":
        out.update(swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)), swiglu_limit=float(cfg.get("swiglu_limit", 7.0)))
        quant = (cfg.get("quantization_config") or {}).get("quant_method")
        if quant not in (None, "mxfp4"):  # MXFP4 experts are dequantized at load (loading/mxfp4.py)
            raise ConfigError(f"this GPT-OSS checkpoint is quantized with {quant!r}, which magicdec does not read")
    return out


def _per_type(cfg: dict[str, Any]) -> bool:
    params = cfg.get("rope_parameters") or {}
    return "full_attention" in params or "sliding_attention" in params


def _rope_parameters(cfg: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """The RoPE parameters of one layer type (transformers 5's per-type dict, or the one for all)."""
    params = cfg.get("rope_parameters") or {}
    if _per_type(cfg):
        return params.get(layer_type) or {}
    return {"rope_theta": cfg.get("rope_theta", 10000.0), **params}


def _windows(cfg: dict[str, Any], family: str) -> dict[str, Any]:
    """sliding_window and layer_types as transformers decides them: `layer_types` when saved; otherwise
    Qwen2/Qwen3's use_sliding_window from layer max_window_layers on, Gemma 2's alternation (sliding first),
    Gemma 3's sliding_window_pattern (every n-th layer global), Mistral's window on every layer."""
    window = cfg.get("sliding_window")
    n = cfg["num_hidden_layers"]
    if family in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") and not cfg.get("use_sliding_window", False):
        window = None
    if family in ("smollm3", "olmo2", "granite", "llama", "olmoe") and not cfg.get("use_sliding_window", False):
        window = None
    if not window:
        return {}
    types = cfg.get("layer_types")
    if types is None and family in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
        start = cfg.get("max_window_layers", n)
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    if types is None and family == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if types is None and family == "gemma3_text":
        pattern = cfg.get("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if types is None:
        return {"sliding_window": int(window)}
    layer_types = tuple("sliding" if "sliding" in t else "full" for t in types)
    if "sliding" not in layer_types:
        return {}
    return {"sliding_window": int(window), "layer_types": layer_types}


def _rope_theta(params: dict[str, Any]) -> float:
    return params.get("rope_theta", 10000.0)


def _rope_scaling(cfg: dict[str, Any], params: dict[str, Any] | None = None) -> RopeScaling:
    rs = cfg.get("rope_scaling") or params or cfg.get("rope_parameters") or {}
    rope_type = rs.get("rope_type", rs.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}. "
            "Checkpoints using dynamic NTK scaling are not supported yet."
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
    if rope_type == "longrope":  # Phi-3: factor is the ratio of the two contexts unless given
        if factor is None:
            common["factor"] = cfg.get("max_position_embeddings", original) / original
        attention = rs.get("attention_factor")
        return RopeScaling(**common, short_factor=tuple(map(float, rs["short_factor"])),
                           long_factor=tuple(map(float, rs["long_factor"])),
                           attention_factor=None if attention is None else float(attention))
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

