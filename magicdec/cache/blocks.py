"""The block pool of a paged KV cache: which fixed-size blocks are free, who holds the others, and which
hold a known prefix (prefix caching). Pure bookkeeping: the tensors live in `PagedKVCache`.

A block is free (reference count 0) or held by one or more requests. A full block whose tokens and
whole prefix are known carries a hash: `sha256(parent's hash ‖ its token ids)`, a chain, so equal
hashes mean equal prefixes (a collision would serve another prefix's keys: hence a cryptographic
hash, not Python's). When its last holder lets it go, a hashed block keeps its contents and stays
findable until the pool reuses it. Free blocks holding no known prefix are handed out first (oldest-freed
first); only when none is left is a cached block evicted, the least recently freed one, losing its hash
(LRU eviction of the prefix cache, which keeps every prefix the pool has room for).

`BlockPool.events` (a `PrefixEvents`, or None) is told of every change to the set of cached prefixes: a
block registered (its hash, its parent's, its tokens), a cached block evicted, the cache cleared. The
server publishes them as vLLM's KV events (`magicdec.server.kv_events`); the cache imports nothing of it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

ROOT = b"magicdec-prefix-v1"


def chain_hashes(tokens: Sequence[int], block_size: int, parent: bytes = ROOT) -> list[bytes]:
    """The hash of every full block of `tokens`, each over its parent's hash and its own tokens."""
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.sha256(parent)
        h.update(array("q", tokens[start : start + block_size]).tobytes())
        parent = h.digest()
        out.append(parent)
    return out


class PrefixEvents(Protocol):
    """What a listener hears of the prefix cache (called on the engine's thread: must not block)."""

    def stored(self, hashes: Sequence[bytes], parent: bytes | None, token_ids: Sequence[int],
               block_size: int) -> None:
        """Consecutive blocks of one prefix became findable: their hashes, the hash of the block before
        the first (None: it starts the prompt) and their tokens (block_size per hash)."""

    def removed(self, hashes: Sequence[bytes]) -> None:
        """Cached blocks were evicted: their prefixes are no longer findable."""

    def cleared(self) -> None:
        """Every cached prefix was forgotten."""


class KVLeakError(RuntimeError):
    """KV blocks are still held after every request ended."""


@dataclass(slots=True)
class PrefixStats:
    """Prefix-cache lookups, in tokens (vLLM's `prefix_cache_queries` / `prefix_cache_hits`)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs ≥ 1 block of ≥ 1 token, got {num_blocks} × {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash → block
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # uncached, reuse order
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but cached: LRU order
        self.stats = PrefixStats()
        self.events: PrefixEvents | None = None
        self.stored = 0  # prefixes ever registered (a draft pool that was off since can tell it missed some)

    # ---- counts ------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached ones included: they are evicted on reuse)."""
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- allocation --------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` blocks for one holder; raises MemoryError if fewer are free (check `num_free` first)."""
        if n > self.num_free:
            raise MemoryError(f"{n} KV blocks asked, {self.num_free} free")
        out, evicted = [], []
        for _ in range(n):
            if self.free:
                block, _ = self.free.popitem(last=False)
            else:  # evict the least recently freed cached block from the prefix cache
                block, _ = self.evictable.popitem(last=False)
                h = self.hash_of[block]
                assert h is not None
                del self.cached[h]
                self.hash_of[block] = None
                evicted.append(h)
            self.refs[block] = 1
            out.append(block)
        if evicted and self.events is not None:
            self.events.removed(evicted)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """A holder lets its blocks go (last blocks first: a prefix's tail is evicted before its head)."""
        for block in reversed(blocks):
            if self.refs[block] <= 0:
                raise AssertionError(f"block {block} released more often than held")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                (self.free if self.hash_of[block] is None else self.evictable)[block] = None

    # ---- prefix cache ------------------------------------------------------------------------------
    def match(self, hashes: Sequence[bytes], limit: int) -> list[int]:
        """Take (hold) the cached blocks of the longest known prefix among `hashes`, at most `limit` blocks."""
        out: list[int] = []
        for h in hashes[:limit]:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        for block in out:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
        return out

    def record_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        self.stats.queries += query_tokens
        self.stats.hits += hit_tokens

    def register(self, block: int, h: bytes) -> bool:
        """Mark a held block as holding the prefix with hash `h` (if that prefix is not cached yet): whether
        it was (`register_chain` tells the listener)."""
        if self.hash_of[block] is None and h not in self.cached:
            self.hash_of[block] = h
            self.cached[h] = block
            self.stored += 1
            return True
        return False

    def register_chain(self, blocks: Sequence[int], hashes: Sequence[bytes], parent: bytes | None,
                       tokens: Sequence[int]) -> None:
        """Register consecutive blocks of one prompt (`hashes[i]` for `blocks[i]`; `parent`: the hash of the
        block before the first, None at the prompt's start; `tokens`: theirs), and tell the listener of the
        runs of them that became findable, each with its parent."""
        P = self.block_size
        run: list[int] = []  # indices of a run of newly stored blocks

        def flush() -> None:
            if run and self.events is not None:
                first = run[0]
                self.events.stored([hashes[i] for i in run], hashes[first - 1] if first else parent,
                                   tokens[first * P : (run[-1] + 1) * P], P)
            run.clear()

        for i, (block, h) in enumerate(zip(blocks, hashes)):
            if self.register(block, h):
                run.append(i)
            else:
                flush()
        flush()

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. when a draft model's pool, which they have no KV in, starts):
        the blocks stay where they are (held or free), without their hashes."""
        for block in self.cached.values():
            self.hash_of[block] = None
        self.cached.clear()
        self.free.update(self.evictable)
        self.evictable.clear()
        if self.events is not None:
            self.events.cleared()

    def check_empty(self) -> None:
        """Raise if any block is still held (a leak: every request must release what it holds)."""
        held = [b for b, r in enumerate(self.refs) if r]
        if held:
            raise KVLeakError(f"{len(held)} KV blocks still held after every request ended: {held[:8]} …")
