"""Log-probabilities in OpenAI's response shapes: completions' (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`; with echo the prompt's tokens first, the very first without a log-probability) and chat's
(`content`: one entry per token with its bytes and its `top_logprobs`); vLLM's `prompt_logprobs` (None for
the first prompt token, then {token id: {logprob, rank, decoded_token}} of the token and the k best). A
token's text is its own decoding (special tokens spelled out); the numbers are the target's
log-probabilities before any processing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from magicdec.loading.tokenizer import Tokenizer
from magicdec.runtime.logprobs import TokenLogprob


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, lps: Sequence[TokenLogprob | None], token_ids: Sequence[int],
                        offset: int = 0) -> dict[str, Any]:
    """Completions' logprobs object for `token_ids` (their entries in `lps`; None: the prompt's first token,
    which has none); text offsets from `offset`. top_logprobs holds the chosen token and the k best (vLLM's)."""
    tokens, values, tops, offsets = [], [], [], []
    for t, lp in zip(token_ids, lps):
        text = token_text(tokenizer, t)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(lp.logprob)
        top = {token_text(tokenizer, i): v for i, v in lp.top}
        top.setdefault(text, lp.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def join(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two completions' logprobs objects one after the other (the prompt's, then the output's)."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in b}


def chat_logprobs(tokenizer: Tokenizer, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""

    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps], "refusal": None}


def prompt_logprobs(tokenizer: Tokenizer, lps: Sequence[TokenLogprob | None], k: int) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {"logprob", "rank",
    "decoded_token"}} of the prompt token and its position's k best (ranks 1 … k); -inf as vLLM writes it."""

    def entry(token_id: int, value: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": max(value, -9999.0), "rank": rank, "decoded_token": token_text(tokenizer, token_id)}

    out: list[dict[str, Any] | None] = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        ranked = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for r, (i, v) in enumerate(lp.top[:k], 1):
            ranked[str(i)] = entry(i, v, r)
        out.append(ranked)
    return out
