"""The drafter: proposes γ tokens per sequence with a model over its own (usually sparse) cache.

One class serves every draft method; what differs is configuration:
- self-speculation: the target's own weights over a `SparseKVCache` (StreamingLLM sinks + window,
  or SnapKV-selected positions + window);
- a draft model: a smaller model with a dense or StreamingLLM cache.

Where the draft cache's KV comes from (`kv_source`):
- "target": at prefill, copied from the target's cache (sinks or selected positions, plus each
  prompt's last window); after each round, the accepted positions' target KV is copied in, so the
  draft cache is always an exact sparse subset of the target's. Plain decoding steps between rounds
  (`gamma="auto"` choosing γ = 0) copy nothing: `catch_up` copies their positions (at most the last
  window of them) in one go before the next draft, so a plain step costs what plain decoding does;
- "own": the draft computes it, with its own prefill (windowed for a sparse cache) and the KV of
  its own decoding steps. The draft then lags the target by one or two tokens after a round, which
  it feeds at the start of the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.sparse import SparseKVCache
from magicdec.model.llama import Transformer
from magicdec.runtime.prefill import prefill
from magicdec.runtime.runner import ModelRunner
from magicdec.runtime.sampling import SamplingParams, probabilities, sample
from magicdec.spec.snapkv import select_kept, snapkv_votes


class Drafter:
    def __init__(
        self,
        model: Transformer,
        cache: SparseKVCache | DenseKVCache,
        kv_source: str,
        selection: str = "streaming",
        observe: int = 32,
        pool_kernel: int = 7,
        forward: ModelRunner | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """`forward` runs the draft's decode steps (a shared `ModelRunner`, for CUDA graphs); `vocab_size`:
        the target's, when the draft's vocabulary is a shorter prefix of it."""
        if kv_source == "target" and not isinstance(cache, SparseKVCache):
            raise ValueError("a draft cache built from the target's KV must be sparse")
        self.model, self.cache, self.kv_source = model, cache, kv_source
        self.forward = forward or ModelRunner(model)
        self.selection, self.observe, self.pool_kernel = selection, observe, pool_kernel
        self.vocab_size = vocab_size if vocab_size and vocab_size > model.config.vocab_size else None
        self.seen = torch.zeros(0, dtype=torch.long)  # per row: positions < seen hold draft KV
        self._plain_steps = 0  # plain steps since the last round ("target" mode): `catch_up` copies their KV

    @torch.inference_mode()
    def prefill(
        self, target: Transformer, target_cache: DenseKVCache, tokens: torch.Tensor, prompt_lens: list[int], chunk: int
    ) -> None:
        """Build the draft cache for prompts tokens[b, :prompt_lens[b]] (after the target's prefill)."""
        device = tokens.device
        lens = torch.tensor(prompt_lens, device=device)
        if self.kv_source == "own":
            prefill(self.model, self.cache, self._known(tokens), prompt_lens, chunk)
        else:
            cache = self.cache
            assert isinstance(cache, SparseKVCache)
            cache.reset()
            if self.selection == "snapkv":
                votes = snapkv_votes(target, target_cache, tokens, prompt_lens, self.observe, self.pool_kernel)
                select_kept(cache, target_cache, votes, prompt_lens)
            elif cache.n_kept:
                sinks = torch.arange(cache.n_kept, device=device).expand(len(prompt_lens), -1)
                cache.copy_from(target_cache, torch.where(sinks < lens[:, None], sinks, -1))
            recent = lens[:, None] - cache.window + torch.arange(cache.window, device=device)
            floor = cache.n_kept if self.selection == "streaming" else 0
            cache.copy_from(target_cache, torch.where(recent >= floor, recent, -1))
        self.seen, self._plain_steps = lens.clone(), 0

    @torch.inference_mode()
    def propose(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        gamma: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        active: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft γ tokens after each row's pending token (tokens[b, lengths[b]]); rows not `active`
        (finished) are padding. Returns draft tokens [B, γ] and, when sampling, their distributions [B, γ, V]."""
        B = lengths.shape[0]
        device = lengths.device
        seen = self.seen[:B]
        behind = (lengths - seen).clamp(min=0)  # committed tokens the draft has not seen yet
        if active is not None:
            behind = torch.where(active, behind, 0)
        # "target" mode is always in step with the target; "own" mode may lag by a token or two
        width = 1 if self.kv_source == "target" else int(behind.max()) + 1
        pos = (lengths - behind)[:, None] + torch.arange(width, device=device)
        pos = torch.where(pos <= lengths[:, None], pos, -1)
        if active is not None:
            pos = torch.where(active[:, None], pos, -1)
        ids = self._known(tokens[:B].gather(1, pos.clamp(min=0)))
        index = behind[:, None]
        drafts, dists = [], []
        for i in range(gamma):
            logits = self.forward(ids, pos, self.cache, logits_index=index)[:, 0]
            if params.greedy:
                nxt = logits.argmax(-1)
            else:
                q = probabilities(logits, params)
                nxt = sample(q, generator)
                # a draft vocabulary that is a prefix of the target's puts no mass on the target's extra ids
                dists.append(F.pad(q, (0, self.vocab_size - q.shape[-1])) if self.vocab_size else q)
            drafts.append(nxt)
            if i + 1 < gamma:
                ids, pos = nxt[:, None], (lengths + i + 1)[:, None]
                if active is not None:
                    pos = torch.where(active[:, None], pos, -1)
                index = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.seen[:B] = lengths + gamma
        return torch.stack(drafts, 1), (torch.stack(dists, 1) if dists else None)

    @property
    def max_gamma(self) -> int:
        """The most drafts a round may write: a sparse cache's ring keeps γ + 2 slots of slack."""
        return self.cache.slack - 2 if isinstance(self.cache, SparseKVCache) else 1 << 30

    def _known(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids the draft can embed: ids beyond a shorter draft vocabulary (which its tokenizer never
        produces, but the target may sample) are read as its last id; verification keeps output exact."""
        return ids.clamp(max=self.model.config.vocab_size - 1) if self.vocab_size else ids

    @torch.inference_mode()
    def catch_up(self, target_cache: DenseKVCache, lengths: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Before drafting ("target" mode): copy in the target's KV of positions committed by plain steps
        since the last round (seen .. lengths - 1); only the last `window` of them can still be seen."""
        if self.kv_source != "target" or self._plain_steps == 0:
            return
        assert isinstance(self.cache, SparseKVCache)
        n = min(self._plain_steps, self.cache.window)  # no row is further behind: no device read needed
        self._plain_steps = 0
        B = lengths.shape[0]
        seen = self.seen[:B]
        pos = lengths[:, None] - n + torch.arange(n, device=lengths.device)
        ok = pos >= seen[:, None]
        if active is not None:
            ok &= active[:, None]
        self.cache.copy_from(target_cache, torch.where(ok, pos, -1))
        self.seen[:B] = lengths if active is None else torch.where(active, lengths, seen)

    @torch.inference_mode()
    def commit(self, lengths: torch.Tensor, accepted: torch.Tensor, gamma: int, target_cache: DenseKVCache,
               active: torch.Tensor | None = None) -> None:
        """After verification: positions lengths .. lengths + accepted are now committed (live rows).
        After a plain step (γ = 0) nothing is copied yet: see `catch_up`."""
        B = lengths.shape[0]
        committed = lengths + accepted + 1
        if self.kv_source == "target" and gamma == 0:
            self._plain_steps += 1
            return
        if self.kv_source == "target":
            assert isinstance(self.cache, SparseKVCache)
            offs = torch.arange(gamma + 1, device=lengths.device)
            keep = offs <= accepted[:, None]
            if active is not None:
                keep &= active[:, None]
            self.cache.copy_from(target_cache, torch.where(keep, lengths[:, None] + offs, -1))
            self.seen[:B] = committed
        else:
            self.seen[:B] = torch.minimum(self.seen[:B], committed)

    def compact(self, keep: list[int]) -> None:
        self.cache.compact(keep)
        self.seen = self.seen[keep]
