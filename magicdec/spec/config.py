"""What kind of speculation to run: drafter, γ, draft-cache budget and how that cache is built."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("none", "self", "draft")
DRAFTERS = ("streaming", "snapkv", "full")
KV_SOURCES = ("target", "own")
POSITIONS = ("original", "cache")


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """Speculation settings.

    - method: "none" (plain decoding), "self" (the target's weights over a sparse cache) or "draft"
      (a separate smaller model sharing the tokenizer, `draft_model`).
    - drafter: the draft cache. "streaming": `sinks` first tokens + the most recent
      `budget - sinks`; "snapkv": `budget - window` prompt positions chosen by the prompt's last
      `observe` queries, per layer and KV head, + a sliding window of `window`; "full": the draft
      model's whole cache (draft models only).
    - gamma: draft tokens per round, or "auto" (chosen every round from the cost model).
    - kv_source: "target" builds the self-draft's cache from the target's KV (copied at prefill,
      synced with the accepted tokens' target KV after each round); "own" lets the draft compute its
      own KV (a windowed prefill pass and its own decode KV). Draft models always use "own".
    - positions: RoPE positions of kept tokens, "original" or "cache" (StreamingLLM's in-cache).
    - synthetic_acceptance: for systems benchmarks with random weights only; each draft token is
      accepted with this probability regardless of its value (the output is not the model's).
    - profile: the hardware profile `gamma="auto"` plans with (a built-in name or a JSON file from
      `magicdec profile`); by default the one saved for this device and model, else a built-in.
    """

    method: str = "none"
    drafter: str = "streaming"
    gamma: int | str = 3
    budget: int = 512
    sinks: int = 16
    window: int = 64
    observe: int = 32
    pool_kernel: int = 7
    draft_model: str | None = None
    kv_source: str = "target"
    positions: str = "original"
    max_gamma: int = 8  # the largest γ gamma="auto" may choose
    synthetic_acceptance: float | None = None  # benchmarks only: accept drafts with this probability
    profile: str | None = None  # hardware profile for gamma="auto" (name or JSON); default: this device's

    @property
    def gamma_bound(self) -> int:
        """The largest γ a round can use: the fixed γ, or `max_gamma` when γ is chosen automatically."""
        return self.gamma if isinstance(self.gamma, int) else self.max_gamma

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"speculation: {msg}")

        if self.method not in METHODS:
            bad(f"method must be one of {METHODS}, got {self.method!r}")
        if self.drafter not in DRAFTERS:
            bad(f"drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        if self.kv_source not in KV_SOURCES:
            bad(f"kv_source must be one of {KV_SOURCES}, got {self.kv_source!r}")
        if self.positions not in POSITIONS:
            bad(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.gamma != "auto" and (not isinstance(self.gamma, int) or self.gamma < 1):
            bad(f"gamma must be a positive integer or 'auto', got {self.gamma!r}")
        if self.synthetic_acceptance is not None and not 0 <= self.synthetic_acceptance <= 1:
            bad(f"synthetic acceptance must be in [0, 1], got {self.synthetic_acceptance}")
        if self.method == "none":
            return
        if self.drafter == "streaming" and not 0 <= self.sinks < self.budget:
            bad(f"sinks ({self.sinks}) must be smaller than the budget ({self.budget})")
        if self.drafter == "snapkv":
            if self.method != "self":
                bad("the snapkv drafter selects from the target's own cache: use it with --spec self")
            if self.kv_source != "target":
                bad("the snapkv drafter needs kv_source='target'")
            if not 0 < self.window < self.budget:
                bad(f"the snapkv window ({self.window}) must be positive and smaller than the budget ({self.budget})")
        if self.method == "self" and self.drafter == "full":
            bad("self-speculation over the full cache drafts with the target itself; choose streaming or snapkv")
        if self.method == "draft":
            if not self.draft_model:
                bad("--spec draft needs --draft-model PATH")
            object.__setattr__(self, "kv_source", "own")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def n_kept(self) -> int:
        return self.sinks if self.drafter == "streaming" else self.budget - self.window

    @property
    def recent_window(self) -> int:
        return self.budget - self.sinks if self.drafter == "streaming" else self.window
