"""The OpenAI-compatible request bodies, their checks, and the response shapes.

Every request body is a pydantic model with `extra="forbid"`: a parameter magicdec does not know is a 400
that names it. OpenAI parameters magicdec does not implement (logprobs, echo, penalties, tools, …) are
declared, but accepted only at their neutral values (`presence_penalty: 0`, `echo: false`, …); any other
value is a 400 naming them (log-probabilities too: `logprobs: 0` asks for them as much as 2 does).
An explicit `null` is the parameter's default, as OpenAI takes it. Extensions (vLLM's where vLLM has one):
`top_k`, `ignore_eos`, `return_token_ids`, and `speculation: {"gamma": k}` (0: no speculation for this
request; k: always γ = k). What routers forward (`skip_special_tokens`, `no_stop_trim`, `return_hidden_states`;
for chat `continue_final_message`, `separate_reasoning`, `stream_reasoning`, `include_reasoning`) is accepted
at its default only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from magicdec.engine.outputs import Acceptance, StepOutput

MAX_N = 64  # choices per request (each one is an engine request)
MAX_STOP = 4  # stop strings per request (OpenAI's limit): each is matched against every new token's text
MAX_STOP_CHARS = 256  # characters per stop string (a stream holds back up to this many characters)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request bodies ------------------------------------------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data: Any) -> Any:
        """An explicit null for a parameter that has a default is that default (OpenAI's clients send them);
        text that is not Unicode (a lone surrogate, which JSON's \\u escapes can spell) is refused first."""
        if isinstance(data, dict):
            check_unicode(data)
            fields = cls.model_fields
            return {k: v for k, v in data.items() if not (v is None and k in fields and not fields[k].is_required())}
        return data


def check_unicode(data: dict[str, Any]) -> None:
    """Every string of a request body (keys too) must be encodable as UTF-8: the tokenizer and the answer
    need it. (A loop, not recursion: JSON may nest deeply.)"""
    for top, value in data.items():
        stack = [top, value]
        while stack:
            x = stack.pop()
            if isinstance(x, str):
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise PydanticCustomError("unicode", f"the text of {top!a} is not valid Unicode (a lone UTF-16 "
                                              "surrogate such as \\ud800): send whole characters") from None
            elif isinstance(x, dict):
                stack += [*x, *x.values()]
            elif isinstance(x, list):
                stack += x


class StreamOptions(Strict):
    include_usage: bool = False


class Speculation(Strict):
    """A request's own speculation: `gamma` 0 turns it off, k > 0 drafts (at most) k tokens every round;
    `method`: "self" (the server's model draft), "ngram" or "suffix" (model-free drafts from its own text),
    "hybrid" (each round the better of the two), "none" (off); absent: the server's."""

    gamma: int | None = None
    method: Literal["none", "self", "ngram", "suffix", "hybrid"] | None = None


# OpenAI parameters accepted only at a value that asks for nothing magicdec does not do
Neutral = Callable[[Any], bool]


def _zero(v: Any) -> bool:
    return v == 0


def _falsy(v: Any) -> bool:
    return not v


def _text_format(v: Any) -> bool:
    return isinstance(v, dict) and v.get("type") == "text" and len(v) == 1


def _false(v: Any) -> bool:
    return v is False


def _no_tool_choice(v: Any) -> bool:
    return v == "none"


class Common(Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused
    # extensions
    ignore_eos: bool = False
    return_token_ids: bool = False
    speculation: Speculation | None = None
    # OpenAI's, neutral values only
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    # what a router forwards (the SGLang Model Gateway), accepted at the values magicdec serves
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    return_hidden_states: bool = False

    NEUTRAL: ClassVar[dict[str, Neutral]] = {
        "presence_penalty": _zero, "frequency_penalty": _zero, "logit_bias": _falsy, "logprobs": _false,
        "skip_special_tokens": lambda v: v is True, "no_stop_trim": _false, "return_hidden_states": _false}

    def unsupported(self) -> list[str]:
        return [name for name, ok in self.NEUTRAL.items()
                if getattr(self, name) is not None and not ok(getattr(self, name))]


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    NEUTRAL: ClassVar[dict[str, Neutral]] = {
        **Common.NEUTRAL, "echo": _falsy, "suffix": _falsy, "best_of": lambda v: v == 1}


class ChatRequest(Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # meaningless without tools: accepted, unused
    # what a router forwards (the SGLang Model Gateway), accepted at its defaults
    continue_final_message: bool = False
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    include_reasoning: bool = True  # (vllm-router's)

    NEUTRAL: ClassVar[dict[str, Neutral]] = {
        **Common.NEUTRAL, "top_logprobs": _falsy, "response_format": _text_format, "tools": _falsy,
        "tool_choice": _no_tool_choice, "continue_final_message": _false,
        "separate_reasoning": lambda v: v is True, "stream_reasoning": lambda v: v is True,
        "include_reasoning": lambda v: v is True}


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# ---- checks --------------------------------------------------------------------------------------------
def check_common(body: Common) -> None:
    """Everything about the parameters that does not need the prompt (a 400 naming the parameter)."""
    names = body.unsupported()
    if names:
        raise bad(f"unsupported parameter{'s' * (len(names) > 1)}: {', '.join(names)} (magicdec generates text "
                  "only: no log-probabilities, echo, penalties, logit bias, tools or structured output); drop "
                  f"{'them' if len(names) > 1 else 'it'} or set {'them' if len(names) > 1 else 'it'} to the default",
                  names[0], "unsupported_parameter")
    if not 1 <= body.n <= MAX_N:
        raise bad(f"n must be in 1 … {MAX_N}, got {body.n}", "n")
    if body.temperature is not None and not (math.isfinite(body.temperature) and body.temperature >= 0):
        raise bad(f"temperature must be a finite number ≥ 0 (0 = greedy), got {body.temperature}", "temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {body.top_p}", "top_p")
    if body.top_k is not None and body.top_k < -1:
        raise bad(f"top_k must be ≥ 0, or -1 or 0 for no top-k, got {body.top_k}", "top_k")
    if body.seed is not None and not 0 <= body.seed < (1 << 64) - body.n:
        raise bad(f"seed must be in [0, 2**64 - n), got {body.seed}", "seed")
    stops = stop_strings(body.stop)
    if any(not s for s in stops):
        raise bad("stop strings must be non-empty", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        longest = max(len(s) for s in stops)
        raise bad(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}", "stop")
    if body.stream_options is not None and not body.stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    if body.speculation is not None and body.speculation.gamma is not None and body.speculation.gamma < 0:
        raise bad(f"speculation.gamma must be ≥ 0 (0: no speculation), got {body.speculation.gamma}",
                  "speculation.gamma")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completions request: a text, texts, a token list, or token lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad("prompt is empty: give a string, a list of strings, a list of token ids, or a list of lists "
                  "of token ids", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages for the chat template: roles system / developer (as system) / user / assistant; the content
    a string or a list of text parts."""
    if not messages:
        raise bad("messages is empty", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad(f"unsupported parameter{'s' * (len(extra) > 1)} in {where}: {', '.join(extra)} (text chat "
                      "only: role, content and name)", f"{where}.{extra[0]}", "unsupported_parameter")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role must be 'system', 'developer', 'user' or 'assistant', got {role!r} (text chat "
                      "only: no tool messages)", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': …}}) are supported, "
                              f"got {kind!r}", f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


# ---- responses -----------------------------------------------------------------------------------------
def merged_acceptance(outputs: Sequence[StepOutput]) -> Acceptance:
    acc = Acceptance()
    for o in outputs:
        acc.merge(o.spec)
    return acc


def usage(prompt_tokens: Sequence[int], cached_tokens: int, outputs: Sequence[StepOutput]) -> dict[str, Any]:
    """OpenAI's usage (each prompt counted once, however many choices it has) with the prefix-cache hits
    (`prompt_tokens_details.cached_tokens`) and the speculation figures of all the choices (`speculation`)."""
    completion = sum(len(o.token_ids) for o in outputs)
    acc = merged_acceptance(outputs)
    return {
        "prompt_tokens": sum(prompt_tokens),
        "completion_tokens": completion,
        "total_tokens": sum(prompt_tokens) + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "speculation": {
            "num_drafts": acc.rounds,
            "draft_tokens": acc.draft_tokens,
            "accepted_tokens": acc.accepted_tokens,
            "acceptance_rate": acc.acceptance_rate,
            "mean_accepted_tokens": acc.mean_accepted_tokens,
        },
    }
