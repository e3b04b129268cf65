"""Tools in chat: the request's `tools` and `tool_choice` checked, the grammar that enforces a call, and the
model's output parsed into OpenAI's `tool_calls` (whole, or as stream deltas).

Two output forms are read: Hermes-style `<tool_call>{"name": …, "arguments": …}</tool_call>` blocks anywhere
in the text (Qwen2.5/Qwen3, SmolLM3, Hermes templates), and Llama-3.x's JSON form — the whole output one or
more `{"name": …, "parameters": …}` objects separated by `;` (an optional `<|python_tag|>` first). A block
whose JSON does not parse, or that names no given tool, stays in the content. The content is the text
outside the calls, stripped (None when empty). `tool_choice: "required"` or a named function becomes a
llguidance grammar of the call(s) in the template's form (Hermes when the template writes `<tool_call>`,
else the JSON form): the structured-output machinery then masks target and draft alike. Its JSON is
written as `json.dumps` writes it (no free whitespace, which a weak model would fill its budget with).
"""

from __future__ import annotations

import importlib.util
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from magicdec.runtime.grammar import check_grammar, json_schema_grammar, lark_grammar

MAX_TOOLS = 128  # OpenAI's limit
MAX_TOOL_BYTES = 1 << 18  # the tools' JSON, all together
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


class ToolError(ValueError):
    """A 400 about `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]


def check_tools(tools: list[Any] | None, tool_choice: Any, parallel: bool | None) -> tuple[list[Tool], Any]:
    """The request's tools (validated) and its tool choice ("none", "auto", "required" or a tool's name);
    a ToolError naming the field otherwise."""
    tools = tools or []
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of {'type': 'function', 'function': {...}}", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}", "tools")
    if len(json.dumps(tools)) > MAX_TOOL_BYTES:
        raise ToolError(f"the tools take more than {MAX_TOOL_BYTES} bytes of JSON", "tools")
    out: list[Tool] = []
    grammars = importlib.util.find_spec("llguidance") is not None
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict) \
                or set(t) - {"type", "function"}:
            raise ToolError(f"{where} must be {{'type': 'function', 'function': {{'name', 'description', "
                            "'parameters', 'strict'}}", where)
        f = t["function"]
        extra = sorted(set(f) - {"name", "description", "parameters", "strict"})
        if extra:
            raise ToolError(f"{where}.function: unknown field {extra[0]!r}", f"{where}.function.{extra[0]}")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1 … 64 letters, digits, '_', '.' or '-', got {name!r}",
                            f"{where}.function.name")
        if any(x.name == name for x in out):
            raise ToolError(f"{where}: the tool name {name!r} is given twice", f"{where}.function.name")
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        if f.get("strict") is not None and not isinstance(f["strict"], bool):
            raise ToolError(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
        params = f.get("parameters")
        params = {"type": "object"} if params is None else params
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters must be a JSON schema of an object",
                            f"{where}.function.parameters")
        if grammars:  # (without llguidance a tool is still rendered and its calls parsed, not checked)
            try:
                json_schema_grammar(params)
            except ValueError as e:
                raise ToolError(f"{where}.function.parameters: {e}", f"{where}.function.parameters") from None
        out.append(Tool(name, params))
    choice = "auto" if out else "none"
    if tool_choice is not None:
        if isinstance(tool_choice, str) and tool_choice in ("none", "auto", "required"):
            choice = tool_choice
        elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
                and isinstance(tool_choice.get("function"), dict) \
                and isinstance(tool_choice["function"].get("name"), str):
            choice = tool_choice["function"]["name"]
            if not any(t.name == choice for t in out):
                raise ToolError(f"tool_choice names {choice!r}, which is not in tools", "tool_choice")
        else:
            raise ToolError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                            "'function': {'name': …}}", "tool_choice")
        if choice != "none" and not out:
            raise ToolError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    return out, choice


def tag_expr(tag: str, token_id: int | None) -> str:
    """A tag in a Lark grammar: its token when the tokenizer has one (llguidance takes an added token such as
    Qwen's <tool_call> for a special one, which only the token itself spells), else its text."""
    return f"<[{token_id}]>" if token_id is not None else json.dumps(tag)


def tool_grammar(tools: list[Tool], choice: Any, parallel: bool, hermes: tuple[str, str] | None) -> str | None:
    """The grammar of the output `tool_choice` forces (None for "none" and "auto"): one call (a named
    function, or parallel_tool_calls false) or one or more, in the Hermes form (`hermes`: the Lark
    expressions of the open and close tags, `tag_expr`) or Llama's JSON form."""
    if choice in ("none", "auto"):
        return None
    chosen = [t for t in tools if choice == "required" or t.name == choice]
    key = "arguments" if hermes is not None else "parameters"
    schema = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
              "anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, key: t.parameters},
                          "required": ["name", key], "additionalProperties": False} for t in chosen]}
    if hermes is not None:
        call, sep = f'{hermes[0]} "\\n" body "\\n" {hermes[1]}', '"\\n"'
    else:
        call, sep = "body", '"; "'
    many = choice == "required" and parallel
    lark = (f"start: call{f' ({sep} call)*' if many else ''}\n"
            f"call: {call}\n"
            f"body: %json {json.dumps(schema)}\n")
    grammar = lark_grammar(lark)
    check_grammar(grammar)
    return grammar


def uses_hermes(template: str | None) -> bool:
    return template is not None and OPEN in template


# ---- parsing ----------------------------------------------------------------------------------------------
def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def as_call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    """OpenAI's tool call of a parsed {"name", "arguments" | "parameters"} object, or None if it is not one."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def json_calls(text: str, names: set[str]) -> list[dict[str, Any]] | None:
    """Llama-3.x's form: the whole text is `{…}` objects separated by `;` (None if it is not)."""
    s = text.strip()
    if s.startswith(PYTHON_TAG):
        s = s[len(PYTHON_TAG):].lstrip()
    if not s.startswith("{"):
        return None
    decoder, calls, i = json.JSONDecoder(), [], 0
    while True:
        try:
            obj, i = decoder.raw_decode(s, i)
        except ValueError:
            return None
        call = as_call(obj, names)
        if call is None:
            return None
        calls.append(call)
        rest = s[i:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        i = len(s) - len(rest[1:].lstrip())


def block_call(inner: str, names: set[str]) -> dict[str, Any] | None:
    try:
        return as_call(json.loads(inner), names)
    except ValueError:
        return None


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole output."""
    stream = ToolStream(names)
    stream.feed(text)
    stream.finish()
    content = "".join(stream.content)
    return (content or None), stream.calls


@dataclass
class ToolStream:
    """An output's text, fed as it streams: `feed` and `finish` return the content to emit now and the calls
    completed now. Text that may start a call is held back: a possible `<tool_call>` prefix at the end, an
    open block, and — when the output starts with `{` (Llama's form) — everything until the end. Content is
    the text outside the calls, stripped: trailing whitespace is held until more content follows."""

    names: set[str]
    text: str = ""
    pos: int = 0  # text[:pos] is settled (outside text taken, or calls parsed)
    outside: str = ""  # the settled text outside the calls
    sent: int = 0  # characters of outside.lstrip() emitted
    content: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, new: str) -> tuple[str, list[dict[str, Any]]]:
        self.text += new
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        before = len(self.calls)
        head = (self.outside + self.text[self.pos:]).lstrip()
        if not self.calls and (head.startswith("{") or head.startswith(PYTHON_TAG)):
            if not final:  # Llama's form: nothing until the end
                return "", []
            calls = json_calls(head, self.names)
            if calls is not None:
                self.calls, self.pos = calls, len(self.text)
                return "", calls
        while True:
            start = self.text.find(OPEN, self.pos)
            if start < 0:
                break
            end = self.text.find(CLOSE, start + len(OPEN))
            if end < 0 and not final:
                self.outside += self.text[self.pos:start]
                self.pos = start
                return self._emit(), self.calls[before:]
            stop = len(self.text) if end < 0 else end + len(CLOSE)
            call = block_call(self.text[start + len(OPEN):end if end >= 0 else len(self.text)], self.names)
            self.outside += self.text[self.pos:start] if call is not None else self.text[self.pos:stop]
            if call is not None:
                self.calls.append(call)
            self.pos = stop
        keep = 0 if final else held_prefix(self.text[self.pos:])
        self.outside += self.text[self.pos:len(self.text) - keep]
        self.pos = len(self.text) - keep
        return self._emit(), self.calls[before:]

    def _emit(self) -> str:
        visible = self.outside.strip()
        new = visible[self.sent:]
        self.sent = len(visible)
        if new:
            self.content.append(new)
        return new


def held_prefix(text: str) -> int:
    """How many characters at the end of `text` may begin `<tool_call>`."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0
