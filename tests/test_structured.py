"""Structured outputs (llguidance grammars): every committed token is allowed by the request's grammar, the
mask applies to the target at every verified position and to the draft's proposals, so greedy output with
speculation equals plain greedy output with the same grammar, and the text parses against the schema."""

from __future__ import annotations

import json

import pytest

from magicdec import LLM, SamplingParams, SpecConfig
from magicdec.runtime.grammar import json_schema_grammar
from magicdec.spec.config import DraftTuning

pytestmark = pytest.mark.slow

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                  "maxItems": 3}, "ok": {"type": "boolean"}},
     "required": ["colours", "ok"], "additionalProperties": False},
    None,  # json_object: any JSON object
]
PROMPTS = ["Describe a person as JSON:", "List some colours as JSON:"]


@pytest.mark.parametrize("schema", range(len(SCHEMAS)))
def test_greedy_with_a_grammar_equals_plain_under_speculation(smol: LLM, schema: int) -> None:
    grammar = json_schema_grammar(SCHEMAS[schema])
    params = SamplingParams(max_new_tokens=48, grammar=grammar)
    plain = smol.generate(PROMPTS, params).outputs
    for spec in (SpecConfig(method="self", budget=64, sinks=4, gamma=3),
                 SpecConfig(method="self", drafter="ngram", gamma=4, tuning=DraftTuning(ngram_min=1))):
        out = smol.generate(PROMPTS, params, spec)
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in plain], spec.drafter
        assert out.stats.acceptance.draft_tokens > 0
    finished = [o for o in plain if o.finish_reason == "stop"]
    assert finished  # (the grammar let it end: its EOS is allowed once the object is whole)
    for o in finished:
        value = json.loads(o.text)
        assert isinstance(value, dict)
        if SCHEMAS[schema] is not None:
            assert set(value) == set(SCHEMAS[schema]["required"])


def test_a_bad_grammar_is_refused(smol: LLM) -> None:
    with pytest.raises(ValueError, match="grammar"):
        smol.generate(["x"], SamplingParams(max_new_tokens=2, grammar="start: ("))


def test_the_grammar_ends_the_output_even_with_ignore_eos(smol: LLM) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    params = SamplingParams(max_new_tokens=30, grammar=json_schema_grammar(schema), ignore_eos=True)
    out = smol.generate(["Is water wet? Answer as JSON:"], params).outputs[0]
    assert out.finish_reason == "stop" and json.loads(out.text)["answer"] in ("yes", "no"), out.text
