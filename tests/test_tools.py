"""Tools in chat: a tiny random Qwen3 checkpoint with a byte-level tokenizer and a Hermes-style chat template
(Qwen3's form: the tools listed in the system turn, calls in <tool_call> tags) served by the app in this
process, self-speculation on. `tool_choice` required or named forces a call through the grammar machinery:
greedy output parses into `tool_calls` whose arguments fit the schema, the same with speculation off; the
openai SDK's round trip (tools → tool_calls → a tool message → an answer); streamed deltas reassemble to the
whole answer; the parsers of both output forms; bad tools are a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_families import write_family

from app_server import MODEL, AppServer
from magicdec import LLM, Engine, SpecConfig
from magicdec.server.tools import ToolStream, parse_tool_calls

TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content }}{% for tc in m.tool_calls or [] %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6},
                                                    "exact": {"type": "boolean"}},
                   "required": ["zone", "exact"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris and the time?"}]
OFF = {"speculation": {"gamma": 0}}


def byte_tokenizer(vocab: int) -> Any:
    """A byte-level BPE tokenizer of `vocab` tokens (Qwen's specials at 0 … 2, <tool_call> tags as plain added
    tokens as in Qwen3's), trained on chat and JSON text, so any text (and any JSON) has tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 2, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [TEMPLATE, json.dumps(TOOLS), json.dumps(ASK)] * 4
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken("<tool_call>", normalized=False), AddedToken("</tool_call>", normalized=False)])
    assert tok.get_vocab_size() <= vocab
    return tok


def tool_checkpoint(path: Path) -> Path:
    write_family(path, "qwen3")
    byte_tokenizer(384).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None,
                                                            "chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tool_checkpoint(tmp_path_factory.mktemp("qwen3-tools"))


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[AppServer]:
    llm = LLM(checkpoint, device="cpu")
    spec = SpecConfig(method="self", budget=24, sinks=4, gamma=3)

    def load() -> Engine:
        return Engine(llm=llm, spec=spec, max_num_seqs=2, max_num_batched_tokens=512, prefill_chunk=256,
                      num_blocks=256, quiet=True)

    with AppServer(load) as s:
        yield s


def chat(server: AppServer, **body: Any) -> dict[str, Any]:
    r = server.post("/v1/chat/completions", {"messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 96,
                                             **body})
    assert r.status_code == 200, r.text
    return r.json()


def calls_of(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


def fits(name: str, args: dict[str, Any]) -> bool:
    if name == "get_weather":
        return set(args) == {"city", "unit"} and args["city"] in ("Paris", "Oslo", "Lima") and args["unit"] in "CF"
    return set(args) == {"zone", "exact"} and isinstance(args["exact"], bool) and len(args["zone"]) <= 6


# ---- the template ---------------------------------------------------------------------------------------
def test_the_template_renders_tools_as_transformers_does(checkpoint: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"), chat_template=TEMPLATE)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": {"city": "Oslo", "unit": "C"}}}
    talk = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees <sunny>"}]
    ours = LLM(checkpoint, device="cpu").tokenizer
    for messages in (ASK, talk):
        want = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages, True, TOOLS) == want
    assert '"name": "get_weather"' in want and "<sunny>" in want and ours.template_uses_tools


# ---- the parsers ----------------------------------------------------------------------------------------
NAMES = {"get_weather", "get_time"}
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET", "exact": true}}\n</tool_call>')


def test_hermes_calls_parse_with_the_text_outside_them_as_content() -> None:
    content, calls = parse_tool_calls(HERMES, NAMES)
    assert content == "Let me check."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris", "unit": "C"}),
        ("function", "get_time", {"zone": "CET", "exact": True})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    assert parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', NAMES)[0] is None
    # an unterminated last block that parses is a call (the output ended inside it), one that does not is text
    assert parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {}}', NAMES)[1]
    for text in ('<tool_call>{"name": "get_time", "arguments": {', 'a <tool_call>not json</tool_call> b',
                 '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "Plain text about <tool_"):
        assert parse_tool_calls(text, NAMES) == (text.strip(), []), text


def test_llama_json_calls_parse() -> None:
    for text in ('{"name": "get_weather", "parameters": {"city": "Lima", "unit": "F"}}',
                 '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Lima", "unit": "F"}}',
                 ' {"name": "get_weather", "parameters": {"city": "Lima", "unit": "F"}}; '
                 '{"name": "get_time", "parameters": {"zone": "PET", "exact": false}}'):
        content, calls = parse_tool_calls(text, NAMES)
        assert content is None and calls[0]["function"] == {"name": "get_weather",
                                                            "arguments": '{"city": "Lima", "unit": "F"}'}, text
        assert len(calls) == text.count(";") + 1
    for text in ('{"name": "nope", "parameters": {}}', '{"answer": 3}', '{"name": "get_time", "parameters": {}} x'):
        assert parse_tool_calls(text, NAMES) == (text, []), text


@pytest.mark.parametrize("text", [HERMES, " Hi  <tool_call>{}</tool_call>  there ", "A <tool_c", "<tool_call",
                                  '{"name": "get_time", "parameters": {"zone": "X", "exact": true}}', "\n\n",
                                  HERMES.replace("</tool_call>\n<tool_call>", "</tool_call> and <tool_call>")])
def test_a_stream_fed_in_pieces_reassembles_to_the_whole(text: str) -> None:
    want_content, want_calls = parse_tool_calls(text, NAMES)
    for size in (1, 3, 7):
        stream = ToolStream(NAMES)
        content, calls = "", []
        for i in range(0, len(text), size):
            piece, done = stream.feed(text[i:i + size])
            content, calls = content + piece, calls + done
            assert (want_content or "").startswith(content), (text, size)  # (never text it takes back)
        piece, done = stream.finish()
        content, calls = content + piece, calls + done
        assert (content or None) == want_content, (text, size)
        assert [c["function"] for c in calls] == [c["function"] for c in want_calls]


def test_the_json_form_grammar_takes_llama_calls_as_json_dumps_writes_them() -> None:
    """Without <tool_call> in the template, a forced call is Llama-3.x's JSON object (`;` between calls)."""
    import llguidance

    from magicdec.server.tools import check_tools, tool_grammar

    tokenizer = byte_tokenizer(384)
    ll = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=384, eos_token=[2])
    tools, _ = check_tools(TOOLS, None, None)
    one = '{"name": "get_time", "parameters": {"zone": "CET", "exact": true}}'
    two = one + '; {"name": "get_weather", "parameters": {"city": "Lima", "unit": "F"}}'
    for choice, parallel, text, ok in (("required", True, two, True), ("required", False, two, False),
                                       ("get_time", True, one, True), ("get_weather", True, one, False),
                                       ("required", True, one.replace(", ", ","), False)):
        matcher = llguidance.LLMatcher(ll, tool_grammar(tools, choice, parallel, None), log_level=0)
        ids = tokenizer.encode(text).ids
        accepted = matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()
        assert accepted == ok, (choice, parallel, text)
        assert parse_tool_calls(text, NAMES)[1]


# ---- served -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_time"}}, "required"])
def test_a_forced_call_parses_and_fits_the_schema_with_speculation_on_and_off(server: AppServer,
                                                                               choice: Any) -> None:
    extra = {"parallel_tool_calls": False} if choice == "required" else {}
    on = chat(server, tool_choice=choice, **extra)
    off = chat(server, tool_choice=choice, **extra, **OFF)
    assert on["usage"]["speculation"]["num_drafts"] > 0 and off["usage"]["speculation"]["num_drafts"] == 0
    a, b = on["choices"][0], off["choices"][0]
    # (OpenAI's and vLLM's answer: a call the request named finishes with "stop", a required one "tool_calls")
    assert a["finish_reason"] == b["finish_reason"] == ("tool_calls" if choice == "required" else "stop"), a
    assert a["message"]["content"] is None and calls_of(a["message"]) == calls_of(b["message"])
    [(name, args)] = calls_of(a["message"])
    assert fits(name, args), (name, args)
    if choice != "required":
        assert name == "get_time"


def test_the_openai_sdk_round_trip(server: AppServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=160)  # type: ignore[arg-type]
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    for call in message.tool_calls:
        assert fits(call.function.name, json.loads(call.function.arguments))
    answers = [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"ok": True})} for c in message.tool_calls]
    history = [*ASK, message.model_dump(exclude_none=True), *answers]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0,
                                           max_tokens=12)  # type: ignore[arg-type]
    assert final.choices[0].message.role == "assistant" and final.usage is not None
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_deltas_reassemble_to_the_whole_answer(server: AppServer, choice: Any) -> None:
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "temperature": 0, "max_tokens": 160}
    whole = chat(server, **body)["choices"][0]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    calls: dict[int, dict[str, Any]] = {}
    content, finish = "", None
    for e in events:
        ch = e["choices"][0]
        content += ch["delta"].get("content") or ""
        for d in ch["delta"].get("tool_calls", []):
            calls[d["index"]] = d
        finish = ch["finish_reason"] or finish
    assert finish == whole["finish_reason"] == ("tool_calls" if choice == "required" else "stop")
    assert (content or None) == whole["message"]["content"]
    assert [calls[i]["function"] for i in sorted(calls)] == [c["function"] for c in whole["message"]["tool_calls"]]
    assert sorted(calls) == list(range(len(calls))) and all(c["id"].startswith("call_") for c in calls.values())


def test_auto_and_none_are_served_and_tokenize_renders_the_tools(server: AppServer) -> None:
    for choice in ("auto", "none"):
        out = chat(server, tool_choice=choice, max_tokens=8)
        message = out["choices"][0]["message"]
        assert message["role"] == "assistant"
        assert "tool_calls" not in message or choice == "auto"
    counted = server.post("/tokenize", {"messages": ASK, "tools": TOOLS}).json()["count"]
    assert counted == out["usage"]["prompt_tokens"] > server.post("/tokenize", {"messages": ASK}).json()["count"]


def test_bad_tools_are_a_400_naming_the_field(server: AppServer) -> None:
    fn = WEATHER["function"]
    cases = [({"tools": "get_weather"}, "tools"),
             ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
             ({"tools": [{"type": "function", "function": {**fn, "parameters": []}}]}, "tools[0].function.parameters"),
             ({"tools": [{"type": "function", "function": {**fn, "parameters": {"type": "object", "properties": 3}}}]},
              "tools[0].function.parameters"),
             ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
             ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
             ({"tools": [{"type": "function", "function": {**fn, "name": f"f{i}"}} for i in range(129)]}, "tools"),
             ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tool_choice": "always"}, "tool_choice"),
             ({"tools": [], "tool_choice": "required"}, "tool_choice"),
             ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
             ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[2].tool_call_id")]
    for extra, param in cases:
        r = server.post("/v1/chat/completions", {"messages": ASK, "tools": TOOLS, "max_tokens": 2, **extra})
        assert r.status_code == 400, (param, r.text)
        assert r.json()["error"]["param"] == param, (param, r.json())
