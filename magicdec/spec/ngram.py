"""Prompt lookup (n-gram) drafting: propose the tokens that followed the last n tokens earlier in the
request's own prompt and output.

`NgramProposer` keeps, for every n in [min_n, max_n], a dict from each n-gram of the text to what followed
it: the position of its most recent follower, how often it was followed at all, and the most frequent
follower (with per-token counts only once a second distinct follower appears, so an n-gram seen once
costs one small entry). Appending a token adds the (max_n − min_n + 1) n-grams that end just before it —
the index is never rebuilt — and a proposal is at most k · (max_n − min_n + 1) dict lookups: neither
grows with the context.

`propose(k)` matches the last n tokens, n from max_n down to min_n, and continues with
- mode "recent": the tokens that followed the most recent earlier occurrence (a contiguous copy, vLLM's
  and TensorRT-LLM's prompt lookup; a copy that reaches the text's end goes on over the tokens it
  proposed, so periodic text is copied on);
- mode "frequent": the most frequent follower of the longest matching n-gram, one token at a time (each
  proposed token extends the context that the next lookup matches).

Each proposed token carries an estimate of its chance of being right, from the counts of the longest
n-gram that matches the context before it (proposed tokens included): (c + 1) / (t + 2), c the times that
n-gram was followed by this token and t the times it was followed at all (Laplace's rule of succession: a
follower seen once of once → 2/3, five of five → 6/7, one of three → 2/5).
"""

from __future__ import annotations

from collections.abc import Sequence

from magicdec.spec.lookup import Proposal

MODES = ("recent", "frequent")


class _Entry:
    """What followed one n-gram: its most recent follower's position, how often it was followed, the most
    frequent follower and its count; per-follower counts only once a second distinct follower appears."""

    __slots__ = ("last", "total", "best", "best_count", "counts")

    def __init__(self, last: int, token: int) -> None:
        self.last, self.total, self.best, self.best_count = last, 1, token, 1
        self.counts: dict[int, int] | None = None

    def add(self, last: int, token: int) -> None:
        self.last, self.total = last, self.total + 1
        if self.counts is None:
            if token == self.best:
                self.best_count += 1
                return
            self.counts = {self.best: self.best_count}
        c = self.counts[token] = self.counts.get(token, 0) + 1
        if c >= self.best_count:  # ties go to the most recent follower
            self.best, self.best_count = token, c

    def count(self, token: int) -> int:
        if self.counts is None:
            return self.best_count if token == self.best else 0
        return self.counts.get(token, 0)

    def prob(self, token: int) -> float:
        return (self.count(token) + 1) / (self.total + 2)


class NgramProposer:
    """Prompt lookup for one request (see the module docstring)."""

    source = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4, mode: str = "recent") -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 ≤ min_n ≤ max_n, got min_n={min_n}, max_n={max_n}")
        if mode not in MODES:
            raise ValueError(f"n-gram mode must be one of {MODES}, got {mode!r}")
        self.min_n, self.max_n, self.mode = min_n, max_n, mode
        self.tokens: list[int] = []
        self._index: list[dict[tuple[int, ...], _Entry]] = [{} for _ in range(max_n + 1)]  # by n

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, tokens: Sequence[int]) -> None:
        """Committed tokens: each one is the follower of the n-grams that end just before it."""
        text, index = self.tokens, self._index
        for t in tokens:
            i = len(text)
            for n in range(self.min_n, min(self.max_n, i) + 1):
                key = tuple(text[i - n : i])
                e = index[n].get(key)
                if e is None:
                    index[n][key] = _Entry(i, t)
                else:
                    e.add(i, t)
            text.append(t)

    def _longest(self, tail: list[int]) -> tuple[int, _Entry | None]:
        """The longest n-gram (n from max_n down to min_n) ending `tail` that was followed before."""
        for n in range(min(self.max_n, len(tail)), self.min_n - 1, -1):
            e = self._index[n].get(tuple(tail[len(tail) - n :]))
            if e is not None:
                return n, e
        return 0, None

    def propose(self, k: int) -> Proposal:
        """Up to k tokens after the text so far; empty when its last min_n tokens never occurred before."""
        tail = self.tokens[-self.max_n :]  # the context of each lookup: the text's end, then proposed tokens
        match, e = self._longest(tail)
        out: list[int] = []
        probs: list[float] = []
        pos = e.last if e is not None else len(self.tokens)  # "recent": the copy's source position
        while e is not None and len(out) < k:
            if self.mode == "recent":  # a copy may run into the tokens it proposed (periodic text)
                token = self.tokens[pos] if pos < len(self.tokens) else out[pos - len(self.tokens)]
                pos += 1
            else:
                token = e.best
            out.append(token)
            probs.append(e.prob(token))
            tail.append(token)
            del tail[0]
            if self.mode == "frequent":
                e = self._longest(tail)[1]
            else:  # the copy goes on while its next token followed this context before (its estimate's entry)
                nxt = self.tokens[pos] if pos < len(self.tokens) else out[pos - len(self.tokens)]
                e = self._followed(tail, nxt)
        return Proposal(out, probs, self.source, match if out else 0)

    def _followed(self, tail: list[int], token: int) -> _Entry | None:
        """The longest n-gram ending `tail` that `token` followed before (None: none did)."""
        for n in range(min(self.max_n, len(tail)), self.min_n - 1, -1):
            e = self._index[n].get(tuple(tail[len(tail) - n :]))
            if e is not None and e.count(token):
                return e
        return None
