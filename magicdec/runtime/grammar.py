"""Structured outputs: a grammar's token mask over a request's logits, through llguidance (a maintained Rust
library; JSON schemas, Lark grammars, regular expressions).

A request's `GrammarState` holds its matcher, advanced through its committed tokens. `masks(drafts, T)` gives
the allowed tokens of T consecutive positions with the same convention as `TokenHistory.adjust`: the last
T − 1 drafts lie between the positions, any before them precede position 0. The matcher is advanced through
the drafts to compute them and rolled back after, so a verification masks every position exactly as plain
decoding would after committing the drafts before it, and a draft masks its own proposals the same way; only
committed tokens stay consumed (`commit`). After a draft the grammar refuses, later positions are left
unmasked: that draft is rejected (its masked probability is 0), so nothing after it is committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

BITS = torch.arange(32, dtype=torch.int32)


def grammar_library() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured outputs need llguidance: pip install 'magicdec[structured]'") from None
    return llguidance


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text matching `schema` (None: any JSON object); a ValueError if it is not valid."""
    ll = grammar_library()
    try:
        grammar = ll.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"})
    except Exception as e:  # (llguidance raises ValueError or its own errors)
        raise ValueError(f"the JSON schema cannot be compiled: {e}") from None
    check_grammar(grammar)
    return grammar


def regex_grammar(regex: str) -> str:
    """The grammar of text matching `regex` (Rust's regex syntax); a ValueError if it is not valid."""
    grammar = grammar_library().LLMatcher.grammar_from_regex(regex)
    check_grammar(grammar)
    return grammar


def lark_grammar(lark: str) -> str:
    """A Lark grammar (llguidance's dialect); a ValueError if it is not valid."""
    grammar = grammar_library().LLMatcher.grammar_from_lark(lark)
    check_grammar(grammar)
    return grammar


def check_grammar(grammar: str) -> None:
    """A ValueError naming what is wrong with a grammar (before the request is queued)."""
    ll = grammar_library()
    is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"the grammar is not valid: {messages[0] if messages else 'unknown error'}")


class GrammarTokenizer:
    """llguidance's view of a tokenizer (built once per engine: about half a second)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: Iterable[int]) -> None:
        ll = grammar_library()
        self.vocab_size = vocab_size
        self.ll = ll.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos))


class GrammarState:
    def __init__(self, tokenizer: GrammarTokenizer, grammar: str) -> None:
        ll = grammar_library()
        self.vocab_size = tokenizer.vocab_size
        self.matcher = ll.LLMatcher(tokenizer.ll, grammar, log_level=0)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"grammar: {self.matcher.get_error()}")

    def _mask(self) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return ((words[:, None] >> BITS) & 1).flatten()[: self.vocab_size].bool()

    @property
    def finished(self) -> bool:
        """The grammar allows no further token (its EOS, if any, was consumed)."""
        return bool(self.matcher.is_stopped())

    def commit(self, tokens: Sequence[int]) -> None:
        """Committed output tokens (a token the grammar refuses puts the request in error)."""
        if tokens and not self.matcher.is_stopped():
            self.matcher.consume_tokens(list(tokens))
            self._check()

    def masks(self, drafts: Sequence[int] | torch.Tensor = (), T: int = 1) -> torch.Tensor:
        """Allowed tokens [T, V] (bool) of T positions after the committed tokens and `drafts`."""
        d = [int(t) for t in (drafts.tolist() if isinstance(drafts, torch.Tensor) else drafts)]
        lead = len(d) - (T - 1)
        out = torch.ones((T, self.vocab_size), dtype=torch.bool)
        consumed = self.matcher.try_consume_tokens(d[:lead]) if lead else 0
        if consumed == lead:
            for j in range(T):
                out[j] = self._mask()
                if j == T - 1:
                    break
                if not self.matcher.try_consume_tokens([d[lead + j]]):
                    break  # a draft the grammar refuses: rejected, whatever follows
                consumed += 1
        if consumed:
            self.matcher.rollback(consumed)
        return out
