"""The OpenAI-compatible request bodies, their checks, and the response shapes.

Every request body is a pydantic model with `extra="forbid"`: a parameter magicdec does not know is a 400
that names it. OpenAI parameters magicdec does not implement (suffix, best_of) are declared, but accepted
only at their neutral values (`best_of: 1`, …); any other value is a 400 naming them. An explicit `null` is
the parameter's default, as OpenAI takes it. Log-probabilities, echo, penalties, logit bias, tools
(`magicdec.server.tools`), structured outputs (`response_format`, vLLM's `structured_outputs`: compiled here by
`structured_grammar`) and vLLM's extensions are served; docs/server.md has the table of every field.
Extensions (vLLM's where vLLM has one): `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`, `spaces_between_special_tokens`,
`truncate_prompt_tokens`, `priority` (0 only), `ignore_eos`, `return_token_ids`, `prompt_logprobs`,
`stream_options.continuous_usage_stats`, and `speculation: {"gamma": k}` (0: no speculation for this request;
k: always γ = k). What the SGLang router forwards (`skip_special_tokens`, `no_stop_trim` — vLLM's
include_stop_str_in_output —, `return_hidden_states`: false only) is accepted too, and for chat what vllm-router adds
(`continue_final_message`, `separate_reasoning`, `stream_reasoning`, `include_reasoning`) at its defaults.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from magicdec.engine.outputs import Acceptance, StepOutput
from magicdec.runtime.grammar import json_schema_grammar, lark_grammar, regex_grammar
from magicdec.runtime.sampling import MAX_LOGPROBS

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
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class Speculation(Strict):
    """A request's own speculation: `gamma` 0 turns it off, k > 0 drafts (at most) k tokens every round;
    `method`: "self" (the server's model draft), "ngram" or "suffix" (model-free drafts from its own text),
    "hybrid" (each round the better of the two), "none" (off); absent: the server's."""

    gamma: int | None = None
    method: Literal["none", "self", "ngram", "suffix", "hybrid"] | None = None


# OpenAI parameters accepted only at a value that asks for nothing magicdec does not do
Neutral = Callable[[Any], bool]


def _falsy(v: Any) -> bool:
    return not v


def _false(v: Any) -> bool:
    return v is False


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
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None  # completions: an int (0 … 20); chat: a bool
    prompt_logprobs: Any = None  # vLLM's: the prompt tokens' log-probabilities and k alternatives (0 … 20)
    # vLLM's extensions
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True  # (no effect: fast tokenizers, as in vLLM)
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    # what a router forwards (the SGLang Model Gateway), accepted at the values magicdec serves
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    return_hidden_states: bool = False
    structured_outputs: dict[str, Any] | None = None  # vLLM's: one of json, regex, choice, grammar

    NEUTRAL: ClassVar[dict[str, Neutral]] = {"return_hidden_states": _false}

    def top_logprobs_k(self) -> int | None:
        """The log-probabilities asked for: None, or how many alternatives per token."""
        return None

    def unsupported(self) -> list[str]:
        return [name for name, ok in self.NEUTRAL.items()
                if getattr(self, name) is not None and not ok(getattr(self, name))]


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    NEUTRAL: ClassVar[dict[str, Neutral]] = {**Common.NEUTRAL, "suffix": _falsy, "best_of": lambda v: v == 1}

    def top_logprobs_k(self) -> int | None:
        return None if self.logprobs is None else int(self.logprobs)


class ChatRequest(Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # (default: true)
    # what a router forwards (the SGLang Model Gateway), accepted at its defaults
    continue_final_message: bool = False
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    include_reasoning: bool = True  # (vllm-router's)

    NEUTRAL: ClassVar[dict[str, Neutral]] = {
        **Common.NEUTRAL, "continue_final_message": _false,
        "separate_reasoning": lambda v: v is True, "stream_reasoning": lambda v: v is True,
        "include_reasoning": lambda v: v is True}

    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None  # rendered with the messages (vLLM's)
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
                  "only: no suffix, best_of or hidden states); drop "
                  f"{'them' if len(names) > 1 else 'it'} or set {'them' if len(names) > 1 else 'it'} to the default",
                  names[0], "unsupported_parameter")
    check_extensions(body)
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


def check_extensions(body: Common) -> None:
    """Log-probabilities, penalties and vLLM's extensions (a 400 naming the parameter)."""
    if isinstance(body, ChatRequest):
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise bad(f"logprobs must be true or false in chat completions, got {body.logprobs!r}", "logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise bad(f"top_logprobs must be in 0 … {MAX_LOGPROBS}, got {body.top_logprobs}", "top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    elif body.logprobs is not None and (isinstance(body.logprobs, bool) or not isinstance(body.logprobs, int)
                                        or not 0 <= body.logprobs <= MAX_LOGPROBS):
        raise bad(f"logprobs must be an integer in 0 … {MAX_LOGPROBS} (alternatives per token), got "
                  f"{body.logprobs!r}", "logprobs")
    k = body.prompt_logprobs
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
        raise bad(f"prompt_logprobs must be an integer in 0 … {MAX_LOGPROBS} (alternatives per prompt token), got "
                  f"{k!r}", "prompt_logprobs")
    if k and body.stream:  # (vLLM's rule: a stream has no place for them)
        raise bad("prompt_logprobs are not available when stream is true", "prompt_logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(body, name)
        if v is not None and not -2 <= v <= 2:
            raise bad(f"{name} must be in [-2, 2], got {v}", name)
    if body.repetition_penalty is not None and not (math.isfinite(body.repetition_penalty)
                                                    and body.repetition_penalty > 0):
        raise bad(f"repetition_penalty must be > 0 (1: off), got {body.repetition_penalty}", "repetition_penalty")
    if body.min_p is not None and not 0 <= body.min_p <= 1:
        raise bad(f"min_p must be in [0, 1], got {body.min_p}", "min_p")
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise bad(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise bad(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
    if body.min_tokens < 0:
        raise bad(f"min_tokens must be ≥ 0, got {body.min_tokens}", "min_tokens")
    if body.truncate_prompt_tokens is not None and not (body.truncate_prompt_tokens >= 1
                                                        or body.truncate_prompt_tokens == -1):
        raise bad(f"truncate_prompt_tokens must be ≥ 1 (keep the prompt's last k tokens) or -1 (the model's "
                  f"context), got {body.truncate_prompt_tokens}", "truncate_prompt_tokens")
    if body.priority != 0:
        raise bad(f"priority {body.priority}: magicdec schedules first come, first served; only priority 0 is "
                  "accepted", "priority", "unsupported_parameter")
    if body.stream_options is not None and body.stream_options.continuous_usage_stats and not body.stream:
        raise bad("stream_options.continuous_usage_stats needs stream: true", "stream_options")


def regex_literal(text: str) -> str:
    """`text` as a regular expression that matches it alone (Rust's regex syntax: punctuation escaped)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$#&\-~])", r"\\\1", text)


def structured_grammar(body: Common) -> str | None:
    """The grammar of a request's structured output (chat's response_format, vLLM's structured_outputs), or
    None; a 400 naming the parameter when it cannot be compiled."""
    fmt = body.response_format if isinstance(body, ChatRequest) else None
    so = body.structured_outputs
    if fmt is not None and fmt.get("type") not in (None, "text") and so:
        raise bad("give response_format or structured_outputs, not both", "structured_outputs")
    try:
        if fmt is not None and fmt.get("type") not in (None, "text"):
            kind = fmt.get("type")
            if kind == "json_object":
                return json_schema_grammar(None)
            if kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    raise bad("response_format json_schema needs {'json_schema': {'name': …, 'schema': {…}}}",
                              "response_format")
                return json_schema_grammar(spec.get("schema", {}))
            raise bad(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                      "response_format")
        if so:
            given = [k for k in ("json", "regex", "choice", "grammar") if so.get(k) is not None]
            extra = sorted(set(so) - {"json", "regex", "choice", "grammar"})
            if len(given) != 1 or extra:
                raise bad("structured_outputs takes exactly one of json, regex, choice, grammar", "structured_outputs")
            value = so[given[0]]
            if given[0] == "json":
                return json_schema_grammar(json.loads(value) if isinstance(value, str) else value)
            if given[0] == "regex":
                return regex_grammar(str(value))
            if given[0] == "choice":
                if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
                    raise bad("structured_outputs.choice must be a list of strings", "structured_outputs")
                return regex_grammar("(" + "|".join(regex_literal(c) for c in value) + ")")
            return lark_grammar(str(value))
    except APIError:
        raise
    except Exception as e:  # (the grammar library's errors on a schema it cannot compile)
        param = "response_format" if fmt is not None and fmt.get("type") not in (None, "text") else \
            "structured_outputs"
        raise bad(f"{param}: {e}", param) from None
    return None


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


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for the chat template: roles system / developer (as system) / user / assistant / tool; the
    content a string or a list of text parts. An assistant's `tool_calls` keep their ids and names, their
    arguments parsed into objects (as vLLM gives them to templates, which write them with `tojson`); a tool
    message keeps its `tool_call_id`."""
    if not messages:
        raise bad("messages is empty", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"{where}.role must be 'system', 'developer', 'user', 'assistant' or 'tool', got {role!r}",
                      f"{where}.role")
        allowed = {"role", "content", "name"} | ({"tool_calls"} if role == "assistant" else set()) \
            | ({"tool_call_id"} if role == "tool" else set())
        extra = sorted(set(m) - allowed)
        if extra:
            raise bad(f"unsupported parameter{'s' * (len(extra) > 1)} in {where}: {', '.join(extra)} (a {role} "
                      f"message has {', '.join(sorted(allowed))})", f"{where}.{extra[0]}", "unsupported_parameter")
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
        calls = m.get("tool_calls")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if m.get("name") is not None:
            msg["name"] = m["name"]
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad(f"{where}.tool_call_id must be the id of the call this answers", f"{where}.tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
        if calls:
            msg["tool_calls"] = message_tool_calls(calls, f"{where}.tool_calls")
        out.append(msg)
    return out


def message_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls for the template: {id, type, function: {name, arguments: {...}}}."""
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list of tool calls", where)
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
            raise bad(f"{where}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', 'arguments': "
                      "<a JSON string>}}", f"{where}[{j}]")
        try:
            arguments = json.loads(f["arguments"])
        except ValueError:
            raise bad(f"{where}[{j}].function.arguments is not JSON", f"{where}[{j}].function.arguments") from None
        out.append({"id": c.get("id"), "type": "function", "function": {"name": f["name"], "arguments": arguments}})
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
