"""Grammar libraries compared on the built-in model's vocabulary (SmolLM2's 49,152 tokens): llguidance (what
magicdec uses), xgrammar and outlines-core, where installed. For each grammar — JSON schemas and a regular
expression — a valid document is tokenized, and each library compiles the grammar (fresh, no cache) and then
walks the document: at every token the mask of allowed tokens is computed, checked to allow the document's
next token (and EOS at the end), and the token consumed. Reported: compile time, mask time per token (median
and mean), and at how many steps each library's mask equals llguidance's, or holds it (where only one text
may follow, llguidance allows only that text's canonical tokens, the others every token that spells a
prefix of it). `--whitespace flexible` is each library's default JSON (what magicdec serves: free whitespace
between tokens, which the libraries bound differently); `compact` asks each for JSON without whitespace,
where their masks can be compared. Compile time is what each does before the first mask: llguidance builds
its lexer lazily (the matcher and the first mask are counted), xgrammar precomputes token masks per grammar
state, outlines-core builds its whole index of states × tokens.

    python benchmarks/grammar_speed.py [--repeat 3] [--whitespace flexible|compact] [--out FILE.md]

Install the others beside llguidance without their torch pin: `pip install --no-deps xgrammar
apache-tvm-ffi outlines-core` (xgrammar also imports transformers, pydantic and numpy, which magicdec has).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from magicdec.loading import builtin_model_path, gguf_cache_dir
from magicdec.loading.tokenizer import Tokenizer

SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "person": ({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
        "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
        "required": ["name", "age", "email", "tags"], "additionalProperties": False},
        {"name": "Elizabeth Bennet", "age": 20, "email": "lizzy@longbourn.example", "tags": ["wit", "pride"]}),
    "enum+bool": ({"type": "object", "properties": {
        "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"}, "mood": {"enum": ["calm", "busy", "tired"]}},
        "required": ["colours", "ok", "mood"], "additionalProperties": False},
        {"colours": ["red", "blue"], "ok": True, "mood": "busy"}),
    "order (nested)": ({"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number"}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}, "minItems": 1},
        "ship_to": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["id", "items", "ship_to"], "additionalProperties": False},
        {"id": "ORD-0042", "items": [{"sku": "tea-earl-grey", "qty": 2, "price": 4.5},
                                     {"sku": "scone", "qty": 6, "price": 1.25}],
         "ship_to": {"city": "Meryton", "zip": "04321"}}),
    "12 fields": ({"type": "object", "properties": {f"f{i}": {"type": "integer"} if i % 3 == 0 else
                                                    {"type": "string"} if i % 3 == 1 else {"type": "boolean"}
                                                    for i in range(12)},
                   "required": [f"f{i}" for i in range(12)], "additionalProperties": False},
                  {f"f{i}": i * 7 if i % 3 == 0 else f"value {i}" if i % 3 == 1 else i % 2 == 0 for i in range(12)}),
}
REGEXES = {"date regex": (r"(January|February|March|April|May|June|July|August|September|October|November|December) "
                          r"[1-9][0-9]?, (19|20)[0-9]{2}; [A-Z][a-z]+ [A-Z][a-z]+",
                          "March 14, 2024; Fitzwilliam Darcy")}


@dataclass
class Result:
    compile_s: float
    mask_s: list[float]  # per token, the document's tokens then EOS
    masks: list[torch.Tensor]  # allowed tokens [V] (bool) at each step


def bits_to_bool(words: torch.Tensor, vocab: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    return ((words.reshape(-1)[:, None] >> shifts) & 1).flatten()[:vocab].bool()


def walk(ids: list[int], eos: int, vocab: int, mask: Callable[[], torch.Tensor], advance: Callable[[int], None]
         ) -> tuple[list[float], list[torch.Tensor]]:
    times, masks = [], []
    for step, t in enumerate([*ids, eos]):
        start = time.perf_counter()
        m = mask()
        times.append(time.perf_counter() - start)
        allowed = bits_to_bool(m, vocab)
        if not allowed[t]:
            raise AssertionError(f"step {step}: the document's token {t} is not allowed")
        masks.append(allowed)
        if t != eos:
            advance(t)
    return times, masks


COMPACT = False  # --whitespace compact


def run_llguidance(tok: Tokenizer, vocab: int, eos: int, kind: str, spec: Any, ids: list[int], repeat: int
                   ) -> Result:
    import llguidance as ll

    lltok = ll.LLTokenizer(tok.backend.to_str(), n_vocab=vocab, eos_token=[eos])
    if kind == "json" and COMPACT:
        spec = {**spec, "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}}
    compiles = []
    for _ in range(repeat):  # (compiling is lazy: the matcher is built, then the first mask computed)
        start = time.perf_counter()
        grammar = ll.LLMatcher.grammar_from_json_schema(spec) if kind == "json" else \
            ll.LLMatcher.grammar_from_regex(spec)
        matcher = ll.LLMatcher(lltok, grammar, log_level=0)
        matcher.compute_bitmask()
        compiles.append(time.perf_counter() - start)
    matcher = ll.LLMatcher(lltok, grammar, log_level=0)

    def mask() -> torch.Tensor:
        return torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)

    times, masks = walk(ids, eos, vocab, mask, lambda t: matcher.consume_tokens([t]))
    return Result(min(compiles), times, masks)


def run_xgrammar(tok: Tokenizer, vocab: int, eos: int, kind: str, spec: Any, ids: list[int], repeat: int) -> Result:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiles = []
    for _ in range(repeat):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False, max_threads=1)
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(spec), any_whitespace=not COMPACT,
                                                separators=(",", ":") if COMPACT else None) \
            if kind == "json" else compiler.compile_regex(spec)
        compiles.append(time.perf_counter() - start)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)

    def mask() -> torch.Tensor:
        matcher.fill_next_token_bitmask(bitmask)
        return bitmask

    def advance(t: int) -> None:
        assert matcher.accept_token(t)

    times, masks = walk(ids, eos, vocab, mask, advance)
    return Result(min(compiles), times, masks)


def run_outlines(tok: Tokenizer, vocab: int, eos: int, kind: str, spec: Any, ids: list[int], repeat: int) -> Result:
    import llguidance as ll
    import outlines_core as oc

    lltok = ll.LLTokenizer(tok.backend.to_str(), n_vocab=vocab, eos_token=[eos])  # (each token's bytes)
    tokens: dict[bytes, list[int]] = {}
    for i in range(vocab):
        if i != eos and not lltok.is_special_token(i):
            tokens.setdefault(lltok.decode_bytes([i]), []).append(i)
    vocabulary = oc.Vocabulary(eos, tokens)
    regex = oc.json_schema.build_regex_from_schema(json.dumps(spec), "" if COMPACT else None) \
        if kind == "json" else spec
    compiles = []
    for _ in range(repeat):
        start = time.perf_counter()
        index = oc.Index(regex, vocabulary)
        compiles.append(time.perf_counter() - start)
    guide = oc.Guide(index)
    words = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def mask() -> torch.Tensor:
        guide.write_mask_into(words.data_ptr(), words.numel(), 4)
        return words

    times, masks = walk(ids, eos, vocab, mask, lambda t: guide.advance(t))
    return Result(min(compiles), times, masks)


LIBRARIES = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}


def version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(name)
    except PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="compiles per grammar (the fastest is reported)")
    ap.add_argument("--whitespace", choices=["flexible", "compact"], default="flexible",
                    help="JSON whitespace: each library's default, or none (masks comparable)")
    ap.add_argument("--out", help="also write the markdown table here (appended)")
    args = ap.parse_args()
    global COMPACT
    COMPACT = args.whitespace == "compact"
    torch.set_num_threads(1)
    path = builtin_model_path()
    tok = Tokenizer.from_gguf(path, gguf_cache_dir(path))
    vocab = tok.vocab_size
    eos = tok.token_id(tok.eos_token)
    assert eos is not None
    libs = {name: fn for name, fn in LIBRARIES.items() if version(name) is not None}
    cases = [(name, "json", schema, json.dumps(doc, separators=(",", ":"))) for name, (schema, doc) in SCHEMAS.items()]
    cases += [(name, "regex", regex, doc) for name, (regex, doc) in REGEXES.items()]
    rows = []
    for name, kind, spec, doc in cases:
        ids = tok.encode(doc, add_special_tokens=False)
        results: dict[str, Result | str] = {}
        for lib, fn in libs.items():
            try:
                results[lib] = fn(tok, vocab, eos, kind, spec, ids, args.repeat)
            except Exception as e:  # (a library that cannot compile or walk this grammar: reported as such)
                results[lib] = f"{type(e).__name__}: {str(e)[:80]}"
        ref = results.get("llguidance")
        for lib, r in results.items():
            if isinstance(r, str):
                rows.append(f"| {name} | {len(ids)} | {lib} | failed: {r} | | | |")
                continue
            same = "—" if not isinstance(ref, Result) or lib == "llguidance" else \
                f"{sum(bool(torch.equal(a, b)) for a, b in zip(r.masks, ref.masks))} / " \
                f"{sum(not bool((b & ~a).any()) for a, b in zip(r.masks, ref.masks))} / {len(r.masks)}"
            us = [t * 1e6 for t in r.mask_s]
            rows.append(f"| {name} | {len(ids)} | {lib} | {r.compile_s * 1e3:.1f} | {statistics.median(us):.0f} | "
                        f"{statistics.mean(us):.0f} | {same} |")
        print(rows[-len(results):] and "\n".join(rows[-len(results):]), flush=True)
    head = [f"JSON whitespace: {args.whitespace}. Machine: {platform.machine()}, {platform.platform()}, 1 thread; "
            f"vocabulary: the built-in SmolLM2's {vocab} tokens. Versions: "
            + ", ".join(f"{lib} {version(lib)}" for lib in libs) + ".", "",
            "| grammar | doc tokens | library | compile (ms) | mask median (µs/token) | mask mean (µs/token) | "
            "steps: masks equal to llguidance's / llguidance's within it / all |", "|---|---|---|---|---|---|---|"]
    table = "\n".join(head + rows)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    main()
