"""What kind of speculation to run: who drafts, over which KV, how many tokens per round.

One vocabulary everywhere (the API, the command line, the benchmarks and the cost model):
- method: "none" (plain decoding), "self" (the target's own weights draft) or "draft" (a separate,
  smaller model sharing the tokenizer, `draft_model`);
- drafter: the KV the draft attends to. "streaming": the first `sinks` tokens + the most recent
  `budget - sinks` (StreamingLLM); "snapkv": `budget - window` prompt positions chosen per layer
  and KV head by the prompt's last queries + a sliding window (self-speculation only); "full": the
  draft model's whole cache (draft models only); "guided": verification-guided block selection (the
  serving engine's self-draft only): the first block, the blocks the last verification attended to most
  and a recent window of `min(tuning.snapkv_window, budget // 2)` tokens (or `tuning.guided_window`),
  within `budget`; with `tuning.guided_scores="layer"` each layer reads its own best-scored blocks;
  "ngram" (prompt lookup) and "suffix" (suffix matching): no model drafts — the request's own prompt and
  output (and, for suffix, recent outputs of every request) propose what followed the text's tail
  (`spec/ngram.py`, `spec/suffix.py`; `gamma`: the most tokens a proposal holds); "hybrid": each round, per
  request, a model-free proposal (`tuning.lookup`) or the sparse self-draft (`tuning.hybrid_draft`, with
  `budget`, `sinks` and `draft_weights` as usual), whichever the cost model expects to commit more tokens
  per unit of time (`spec/hybrid.py`).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field, replace

from magicdec.runtime import checks

METHODS = ("none", "self", "draft")
DRAFTERS = ("streaming", "snapkv", "full", "guided", "ngram", "suffix", "hybrid")
LOOKUPS = ("ngram", "suffix")  # model-free drafters
MODEL_DRAFTERS = ("streaming", "snapkv", "full", "guided")
DRAFT_WEIGHTS = ("full", "int8", "int4")  # int4: PyTorch's int4 weight-only matmul (CPU, CUDA sm80+), groups of 32
KV_SOURCES = ("target", "own")
GUIDED_SCORES = ("max", "sum", "layer")  # the guided draft's block scores: pooled over layers, or per layer


def _bad(msg: str) -> None:
    raise ValueError(f"speculation: {msg}")


@dataclass(frozen=True, slots=True)
class Auto:
    """γ chosen every round by the cost model (0 = a plain step), at most `max_gamma`, planning with the
    hardware `profile` (a built-in name or a JSON file from `magicdec profile`; default: this device's).
    Seeded sampling under it is not reproducible: γ follows the step times measured as it runs, and each γ
    draws different numbers from the seeded generator (the distribution stays exact; greedy output is unchanged)."""

    max_gamma: int = 8
    profile: str | None = None

    def __post_init__(self) -> None:
        checks.text("Auto", "profile", self.profile, optional=True)
        if isinstance(self.max_gamma, bool) or not isinstance(self.max_gamma, int) or self.max_gamma < 1:
            _bad(f"the largest automatic γ (max_gamma) must be a positive integer, got {self.max_gamma!r}")

    def __str__(self) -> str:
        return "auto"


@dataclass(frozen=True, slots=True)
class DraftTuning:
    """Research knobs, rarely changed.

    - kv_source: "target": a self-draft reads the target's own KV blocks through its sparse view (no KV of its
      own); "own": the draft computes KV of its own in a pool of its own, indexed by the same block tables
      (every prefill chunk runs it too). Draft models always use "own".
    - snapkv_window: the sliding window inside a SnapKV budget (at most half the budget).
    - observe, pool_kernel: SnapKV's observation queries and the (odd) width of its vote smoothing.
    - guided_scores: how the guided draft pools a block's score over the verification's layers: "max" (the
      largest attention probability any layer gave to it), "sum" (each layer's largest, summed) or "layer"
      (no pooling: each layer of the draft reads its own best-scored blocks, by its own scores).
    - guided_window: the guided draft's recent window in tokens (None: `min(snapkv_window, budget // 2)`);
      it must leave room in the budget for the sink block and at least one selected block.
    - lookup, hybrid_draft: the hybrid drafter's model-free source ("suffix" or "ngram") and its model draft
      ("streaming", "snapkv", "guided"; "full" for a draft model).
    - ngram_min, ngram_max: the n-grams prompt lookup matches (the longest first).
    """

    kv_source: str = "target"
    snapkv_window: int = 64
    observe: int = 32
    pool_kernel: int = 7
    guided_scores: str = "max"
    guided_window: int | None = None
    lookup: str = "suffix"
    hybrid_draft: str = "streaming"
    ngram_min: int = 2
    ngram_max: int = 4

    def __post_init__(self) -> None:
        who = "DraftTuning"
        checks.text(who, "kv_source", self.kv_source)
        checks.text(who, "guided_scores", self.guided_scores)
        checks.text(who, "lookup", self.lookup)
        checks.text(who, "hybrid_draft", self.hybrid_draft)
        checks.set_fields(self, **{f: checks.integer(who, f, getattr(self, f), optional=f == "guided_window")
                                   for f in ("snapkv_window", "observe", "pool_kernel", "guided_window",
                                             "ngram_min", "ngram_max")})
        if self.lookup not in LOOKUPS:
            _bad(f"the hybrid drafter's model-free source (lookup) must be one of {LOOKUPS}, got {self.lookup!r}")
        if self.hybrid_draft not in MODEL_DRAFTERS:
            _bad(f"the hybrid drafter's model draft (hybrid_draft) must be one of {MODEL_DRAFTERS}, got "
                 f"{self.hybrid_draft!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            _bad(f"prompt lookup needs 1 ≤ ngram_min ≤ ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.kv_source not in KV_SOURCES:
            _bad(f"kv_source must be one of {KV_SOURCES}, got {self.kv_source!r}")
        if self.observe < 1:
            _bad(f"SnapKV's observation window (observe) must be ≥ 1, got {self.observe}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            _bad(f"SnapKV's pool_kernel must be odd and ≥ 1 (an even width shifts the votes), got {self.pool_kernel}")
        if self.snapkv_window < 1:
            _bad(f"snapkv_window must be ≥ 1, got {self.snapkv_window}")
        if self.guided_scores not in GUIDED_SCORES:
            _bad(f"guided_scores must be one of {GUIDED_SCORES}, got {self.guided_scores!r}")
        if self.guided_window is not None and self.guided_window < 1:
            _bad(f"guided_window must be a positive number of tokens (or None for the default), got "
                 f"{self.guided_window!r}")


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """Speculation settings (see the module docstring for `method` and `drafter`).

    gamma: draft tokens per round, or `Auto()` (the string "auto" is taken as `Auto()`); budget: the
    draft's KV budget in tokens; sinks: StreamingLLM's attention sinks inside it."""

    method: str = "none"
    drafter: str = "streaming"
    gamma: int | Auto = 3
    budget: int = 512
    sinks: int = 16
    draft_model: str | None = None
    tuning: DraftTuning = field(default_factory=DraftTuning)
    draft_weights: str = "full"  # self-speculation: the target's weights as they are, or quantized (int8, int4)

    def __post_init__(self) -> None:
        who = "SpecConfig"
        for name in ("method", "drafter", "draft_weights"):
            checks.text(who, name, getattr(self, name))
        if isinstance(self.draft_model, os.PathLike):
            object.__setattr__(self, "draft_model", os.fspath(self.draft_model))
        checks.text(who, "draft_model", self.draft_model, optional=True)
        if not isinstance(self.tuning, DraftTuning):
            raise TypeError(f"{who}: tuning must be a DraftTuning, got {self.tuning!r} ({type(self.tuning).__name__})")
        if self.gamma == "auto":
            object.__setattr__(self, "gamma", Auto())
        if not isinstance(self.gamma, Auto):
            if isinstance(self.gamma, bool) or not isinstance(self.gamma, numbers.Integral):
                raise TypeError(f"{who}: gamma must be a positive integer or 'auto' (or Auto(…)), got "
                                f"{self.gamma!r} ({type(self.gamma).__name__})")
            object.__setattr__(self, "gamma", int(self.gamma))
        checks.set_fields(self, budget=checks.integer(who, "budget", self.budget),
                          sinks=checks.integer(who, "sinks", self.sinks))
        if self.method not in METHODS:
            _bad(f"method must be one of {METHODS}, got {self.method!r}")
        if self.drafter not in DRAFTERS:
            _bad(f"drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        if not isinstance(self.gamma, Auto) and (not isinstance(self.gamma, int) or self.gamma < 1):
            _bad(f"gamma must be a positive integer or 'auto', got {self.gamma!r}")
        if self.draft_weights not in DRAFT_WEIGHTS:
            _bad(f"draft_weights must be one of {DRAFT_WEIGHTS}, got {self.draft_weights!r}")
        if self.draft_weights != "full" and self.method != "self":
            _bad(f"quantized draft weights (--draft-weights {self.draft_weights}) are the target's own and only draft "
                 "with method 'self': add --spec self or drop --draft-weights")
        if self.draft_model and self.method != "draft":
            _bad("a draft model is only used with method 'draft': drop --draft-model or add --spec draft")
        if self.method == "none":
            return
        if self.drafter in LOOKUPS:
            if self.method != "self":
                _bad(f"the {self.drafter} drafter proposes from the request's own text, with no model: use it with "
                     "method 'self'")
            if self.draft_weights != "full":
                _bad(f"the {self.drafter} drafter runs no model: drop --draft-weights")
            return
        if self.drafter == "hybrid":
            replace(self, drafter=self.tuning.hybrid_draft)  # its model draft must be valid on its own
            return
        if self.budget < 1:
            _bad(f"the draft KV budget (--budget) must be ≥ 1 token, got {self.budget}")
        if self.drafter == "streaming" and self.sinks < 0:
            _bad(f"the number of attention sinks (--sinks) must be ≥ 0, got {self.sinks}")
        if self.drafter == "streaming" and self.sinks >= self.budget:
            _bad(f"the attention sinks (--sinks {self.sinks}) must leave room for a recent window inside the "
                 f"budget (--budget {self.budget}): use fewer sinks or a larger budget")
        if self.drafter == "snapkv":
            if self.method != "self":
                _bad("the snapkv drafter selects from the target's own cache: use it with method 'self'")
            if self.tuning.kv_source != "target":
                _bad("the snapkv drafter needs kv_source='target'")
            if self.budget < 2:
                _bad(f"a snapkv budget holds selected positions and a window: --budget ≥ 2, got {self.budget}")
        if self.drafter == "guided":
            if self.method != "self":
                _bad("the guided drafter selects blocks of the target's own cache: use it with method 'self'")
            if self.tuning.kv_source != "target":
                _bad("the guided drafter needs kv_source='target'")
            if self.budget < 2:
                _bad(f"a guided budget holds selected blocks and a window: --budget ≥ 2, got {self.budget}")
            if self.tuning.guided_window is not None and self.tuning.guided_window >= self.budget:
                _bad(f"the guided window (guided_window={self.tuning.guided_window}) must leave room inside the "
                     f"budget (--budget {self.budget}) for the sink block and a selected block: use a smaller "
                     "window or a larger budget")
        if self.method == "self" and self.drafter == "full":
            _bad("self-speculation over the full cache drafts with the target itself; choose streaming, snapkv or "
                 "guided")
        if self.method == "draft":
            if not self.draft_model:
                _bad("method 'draft' needs a draft model (--draft-model PATH)")
            if self.tuning.kv_source != "own":
                object.__setattr__(self, "tuning", replace(self.tuning, kv_source="own"))

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def gamma_bound(self) -> int:
        """The largest γ a round can use: the fixed γ, or the automatic policy's `max_gamma`."""
        return self.gamma.max_gamma if isinstance(self.gamma, Auto) else self.gamma

    @property
    def lookup(self) -> str | None:
        """The model-free source ("ngram" or "suffix") of this setting, or None."""
        if self.drafter in LOOKUPS:
            return self.drafter
        return self.tuning.lookup if self.drafter == "hybrid" else None

    @property
    def model_side(self) -> SpecConfig | None:
        """The setting of the model that drafts (None for a model-free drafter; for hybrid, its model draft)."""
        if not self.enabled or self.drafter in LOOKUPS:
            return None
        return replace(self, drafter=self.tuning.hybrid_draft) if self.drafter == "hybrid" else self

    @property
    def n_kept(self) -> int:
        """Slots that stay visible: StreamingLLM's sinks, or SnapKV's selected positions."""
        return self.sinks if self.drafter == "streaming" else self.budget - self.recent_window

    @property
    def recent_window(self) -> int:
        if self.drafter == "streaming":
            return self.budget - self.sinks
        if self.drafter == "guided" and self.tuning.guided_window is not None:
            return self.tuning.guided_window
        return min(self.tuning.snapkv_window, self.budget // 2)

    def min_budget(self, block_size: int) -> int:
        """The smallest `budget` this drafter accepts over a paged cache of `block_size`-token blocks, every
        constraint counted: streaming's sinks and a window; SnapKV's selected positions and a window; the guided
        draft's sink block, a selected block and its window (`min(snapkv_window, budget // 2)` unless
        `tuning.guided_window` is given, which needs two blocks beside it); a hybrid's, its model draft's."""
        if self.drafter == "hybrid":
            side = self.model_side
            assert side is not None
            return side.min_budget(block_size)
        if self.drafter == "streaming":
            return self.sinks + 1
        if self.drafter != "guided":
            return 2
        if self.tuning.guided_window is not None:
            return self.tuning.guided_window + 2 * block_size
        b = block_size
        while b - min(self.tuning.snapkv_window, b // 2) < block_size:
            b += 1
        return b

    def fitted(self, context: int, block_size: int = 64) -> SpecConfig:
        """This configuration with its budget cut to `context` tokens (the longest prompt and its new tokens),
        never below `min_budget`: a sparse draft never holds more positions than there are, and a larger budget
        only costs memory (SnapKV's kept positions are reserved per request). Itself when the budget fits."""
        budget = max(context, self.min_budget(block_size))
        return self if not self.enabled or self.drafter in ("full", *LOOKUPS) or self.budget <= budget else \
            replace(self, budget=budget)

    @property
    def label(self) -> str:
        """A short name: plain, self-streaming-512-g3, draft-full-gauto, …"""
        if not self.enabled:
            return "plain"
        budget = "" if self.drafter in ("full", *LOOKUPS) else f"-{self.budget}"
        weights = "" if self.draft_weights == "full" else f"-{self.draft_weights}"
        return f"{self.method}-{self.drafter}{budget}{weights}-g{self.gamma}"
