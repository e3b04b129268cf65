"""Suffix drafting (SuffixDecoding): continuations of the longest earlier match of the text's end, scored by
how often they followed it, in the request's own text and in a shared store of recent outputs.

`SuffixAutomaton` is an online suffix automaton over one request's prompt and output (Blumer et al.): a
token is appended in O(1) amortized structure updates. Each state (a class of substrings sharing their end
positions) also keeps how often its strings occur and where they last ended (and the time before): the
new end position is added to the states on the suffix-link path from the new state, longest suffix first: a
walk as long as the number of distinct occurrence classes among the text's suffixes, about 2 states on the
novels (`chain` records the last walk's length; benchmarks/lookup_cost.py prints its mean). Periodic text
("a b a b …", a model repeating itself) would walk its whole length, so the walk stops after `max_walk`
states: the counts of the shortest contexts of such text then lag (they only score proposals, which stay
exact whatever they are), and an append costs O(1) amortized plus at most `max_walk` updates.

`SuffixTrie` is the optional global store: a trie of every suffix (at most `depth` tokens deep) of the most
recent outputs of all requests, with occurrence counts; bounded to `capacity` tokens of outputs, the least
recently used output (added, or the source of a proposal) evicted first.

Scoring (`SuffixProposer.propose`): match the longest suffix s of the text that occurred before (the
automaton: the suffix link of the whole text's state; the trie: the longest suffix, at most `depth −
max_len` tokens, that is a path from its root). Then extend greedily: at context x (s, then s and the
tokens proposed so far; when x occurred only at the text's end, its longest suffix that occurred before)
take the follower t of x seen most often (ties: the most recent), and estimate its chance as
(c + a) / (d + a + b), c the occurrences of x·t and d those of x with any follower, (a, b) = `prior`
pseudo-counts for "right" and "wrong" ((1, 1): Laplace's rule of succession). The path's probability is
the product of these; the proposal stops before it falls below `threshold`, at `max_len` tokens, at k,
and at ⌈`factor` · |s|⌉ tokens (SuffixDecoding's bound: a short match earns a short guess). The request's
own automaton and the global trie each propose; the one with the larger expected accepted length wins
(ties: the request's own). The defaults (threshold 0.1, factor 2, prior (4, 0.5): a continuation seen once
of once is right 5 times in 5.5) come from benchmarks/lookup_tune.py on the workloads' "tune" split
(`magicdec.bench.workloads`), with the built-in model's greedy outputs.

Cost per round: O(|proposal|) automaton steps, each looking at no more than `scan` followers (a state
with more, a short common context, takes its most recent follower), and for the trie O(depth · log depth)
node steps to find the match; neither grows with the context.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from magicdec.spec.lookup import Proposal

STALE = -2  # a trie node's best child after a removal: found again on its next read
MAX_WALK = 64  # occurrence updates per appended token, at most (periodic text would otherwise walk its length)
SCAN = 8  # followers looked at for the most frequent one; a state with more takes its most recent follower


class SuffixAutomaton:
    """The suffix automaton of a growing token sequence, with occurrence counts and last end positions."""

    def __init__(self, max_walk: int = MAX_WALK) -> None:
        self.max_walk = max_walk
        self.tokens: list[int] = []
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.count: list[int] = [0]  # |endpos|: occurrences of the state's strings
        self.last_end: list[int] = [-1]  # their most recent end position
        self.prev_end: list[int] = [-1]  # … and the one before
        self.last = 0  # the state of the whole text
        self.chain = 0  # states the last append's occurrence update walked

    def __len__(self) -> int:
        return len(self.tokens)

    def _new(self, length: int, link: int, nxt: dict[int, int], count: int, last: int, prev: int) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.count.append(count)
        self.last_end.append(last)
        self.prev_end.append(prev)
        return len(self.length) - 1

    def append(self, tokens: Sequence[int]) -> None:
        nxt, link, length = self.next, self.link, self.length
        for c in tokens:
            i = len(self.tokens)
            self.tokens.append(c)
            cur = self._new(length[self.last] + 1, 0, {}, 0, -1, -1)
            p = self.last
            while p != -1 and c not in nxt[p]:
                nxt[p][c] = cur
                p = link[p]
            if p != -1:
                q = nxt[p][c]
                if length[p] + 1 == length[q]:
                    link[cur] = q
                else:
                    clone = self._new(length[p] + 1, link[q], dict(nxt[q]), self.count[q], self.last_end[q],
                                      self.prev_end[q])
                    while p != -1 and nxt[p].get(c) == q:
                        nxt[p][c] = clone
                        p = link[p]
                    link[q] = link[cur] = clone
            self.last = cur
            v, walked = cur, 0
            while v > 0 and walked < self.max_walk:  # every suffix of the text now also ends at i
                self.count[v] += 1
                self.prev_end[v], self.last_end[v] = self.last_end[v], i
                v = link[v]
                walked += 1
            self.chain = walked

    def match(self) -> int:
        """The state of the longest suffix of the text that also occurred earlier (0, the root: none)."""
        return self.link[self.last] if self.last else 0

    def followed(self, state: int) -> int:
        """Occurrences of the state's strings that have a follower (all but one at the text's end)."""
        return max(self.count[state] - (self.last_end[state] == len(self.tokens) - 1), 0)

    def best_follower(self, state: int, scan: int = SCAN) -> int | None:
        """The follower seen most often (ties: the most recent) among at most `scan`; with more, the most
        recent follower. None: the state was never followed."""
        nxt = self.next[state]
        if not nxt:
            return None
        if len(nxt) <= scan:
            return max(nxt, key=lambda t: (self.count[nxt[t]], self.last_end[nxt[t]]))
        end = self.last_end[state]
        if end == len(self.tokens) - 1:
            end = self.prev_end[state]
        return self.tokens[end + 1] if 0 <= end + 1 < len(self.tokens) else next(iter(nxt))


class _Node:
    __slots__ = ("children", "count", "best", "owner")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0
        self.best = -1  # the child with the largest count: kept on insert, found again on a read after a removal
        self.owner: Hashable = None  # the output that last inserted through this node (for LRU on use)


class SuffixTrie:
    """Every suffix, cut at `depth` tokens, of the most recent outputs; at most `capacity` tokens of them."""

    def __init__(self, depth: int = 32, capacity: int = 1 << 16) -> None:
        if depth < 2 or capacity < 1:
            raise ValueError(f"a suffix trie needs depth ≥ 2 and capacity ≥ 1 token, got depth={depth}, "
                             f"capacity={capacity}")
        self.depth, self.capacity = depth, capacity
        self.clear()

    def clear(self) -> None:
        """Forget every output."""
        self.root = _Node()
        self.outputs: OrderedDict[Hashable, list[int]] = OrderedDict()  # least recently used first
        self.tokens = 0

    def add(self, key: Hashable, tokens: Sequence[int]) -> None:
        """Store an output (a finished request's tokens) under `key`, evicting the least recently used
        outputs beyond `capacity` tokens; an output longer than the capacity keeps its last `capacity`."""
        if key in self.outputs:
            self._remove(key)
        seq = list(tokens)[-self.capacity :]
        if not seq:
            return
        self.outputs[key] = seq
        self.tokens += len(seq)
        for i in range(len(seq)):
            node = self.root
            node.count += 1
            for t in seq[i : i + self.depth]:
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node()
                child.count += 1
                child.owner = key
                b = node.children.get(node.best)
                if node.best != STALE and (b is None or child.count >= b.count):
                    node.best = t
                node = child
        while self.tokens > self.capacity:
            self._remove(next(iter(self.outputs)))

    def _remove(self, key: Hashable) -> None:
        seq = self.outputs.pop(key)
        self.tokens -= len(seq)
        for i in range(len(seq)):
            node = self.root
            node.count -= 1
            for t in seq[i : i + self.depth]:
                child = node.children[t]
                child.count -= 1
                if node.best == t:
                    node.best = STALE  # found again when a proposal next reads this node
                if child.count == 0:
                    del node.children[t]
                    break
                node = child

    def touch(self, key: Hashable) -> None:
        if key in self.outputs:
            self.outputs.move_to_end(key)

    def _walk(self, tokens: Sequence[int]) -> _Node | None:
        node: _Node | None = self.root
        for t in tokens:
            node = node.children.get(t) if node is not None else None
        return node

    def match(self, tail: Sequence[int], longest: int) -> tuple[int, _Node | None]:
        """The longest suffix of `tail` (at most `longest` tokens) that is a path from the root, and its node.
        Suffixes of stored text are stored too, so a suffix matching means every shorter one does: a binary
        search over lengths."""
        lo, hi, node = 0, min(longest, len(tail)), None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            found = self._walk(tail[len(tail) - mid :])
            if found is not None:
                lo, node = mid, found
            else:
                hi = mid - 1
        return lo, node


class SuffixProposer:
    """Suffix drafting for one request (see the module docstring): its own automaton over prompt and output,
    and optionally the global trie of recent outputs (`shared`)."""

    source = "suffix"

    def __init__(self, shared: SuffixTrie | None = None, threshold: float = 0.1, max_len: int = 16,
                 factor: float = 2.0, min_match: int = 1, scan: int = SCAN,
                 prior: tuple[float, float] = (4.0, 0.5)) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"the suffix proposer's threshold must be in [0, 1), got {threshold}")
        if max_len < 1 or factor <= 0 or min_match < 1:
            raise ValueError(f"the suffix proposer needs max_len ≥ 1, factor > 0 and min_match ≥ 1, got "
                             f"max_len={max_len}, factor={factor}, min_match={min_match}")
        if shared is not None and shared.depth <= max_len:
            raise ValueError(f"the shared suffix trie's depth ({shared.depth}) must exceed max_len ({max_len}): "
                             "a match needs room below it to propose from")
        if min(prior) <= 0:
            raise ValueError(f"the suffix proposer's prior pseudo-counts must be positive, got {prior}")
        self.prior = prior
        self.automaton = SuffixAutomaton()
        self.shared = shared
        self.threshold, self.max_len, self.factor, self.min_match, self.scan = threshold, max_len, factor, \
            min_match, scan

    @property
    def tokens(self) -> list[int]:
        return self.automaton.tokens

    def __len__(self) -> int:
        return len(self.automaton)

    def append(self, tokens: Sequence[int]) -> None:
        self.automaton.append(tokens)

    def _chance(self, c: int, d: int) -> float:
        a, b = self.prior
        return (c + a) / (d + a + b)

    def _limit(self, k: int, match: int) -> int:
        return min(k, self.max_len, math.ceil(self.factor * match))

    def propose(self, k: int) -> Proposal:
        own = self._own(k)
        if self.shared is None or not self.shared.outputs:
            return own
        other = self._shared(k)
        return other if other.expected_accepted > own.expected_accepted else own

    def _own(self, k: int) -> Proposal:
        sa = self.automaton
        state = sa.match()
        match = sa.length[state]
        if match < self.min_match:
            return Proposal(source=self.source)
        out: list[int] = []
        probs: list[float] = []
        path, limit = 1.0, self._limit(k, match)
        while len(out) < limit:
            while state > 0 and sa.followed(state) == 0:  # its only occurrence ends the text: a shorter context
                state = sa.link[state]
            t = sa.best_follower(state, self.scan) if state > 0 else None
            if t is None:
                break
            child = sa.next[state][t]
            followed = sa.followed(state)
            p = self._chance(min(sa.count[child], followed), followed)  # min: counts a capped walk left behind
            if path * p < self.threshold:
                break
            path *= p
            out.append(t)
            probs.append(p)
            state = child
        return Proposal(out, probs, self.source, match if out else 0)

    def _shared(self, k: int) -> Proposal:
        trie = self.shared
        assert trie is not None
        tail = self.tokens[-(trie.depth - self.max_len) :]
        match, node = trie.match(tail, trie.depth - self.max_len)
        if node is None or match < self.min_match:
            return Proposal(source=self.source + "-global")
        out: list[int] = []
        probs: list[float] = []
        path, limit = 1.0, self._limit(k, match)
        while len(out) < limit:
            if node.best == STALE:
                node.best = max(node.children, key=lambda c: (node.children[c].count, c), default=-1)
            child = node.children.get(node.best)
            if child is None:
                break
            p = self._chance(child.count, node.count)
            if path * p < self.threshold:
                break
            path *= p
            out.append(node.best)
            probs.append(p)
            trie.touch(child.owner)
            node = child
        return Proposal(out, probs, self.source + "-global", match if out else 0)
