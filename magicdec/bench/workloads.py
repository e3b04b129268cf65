"""Copy-heavy workloads from a corpus (the Jane Austen novels by default), for measuring model-free drafts
(prompt lookup, suffix matching) next to plain continuation.

Each workload cuts a passage of whole paragraphs from a book and asks for something that reuses it:
- "qa": the passage, then "find the sentence that mentions ⟨word⟩ and quote it exactly" (the word occurs in
  that one sentence of the passage); the answer is a quote of the passage (`reference`).
- "revise": the passage, then one of its paragraphs again, to be revised for a modern reader keeping the
  wording: the answer copies most of it (`reference`: the paragraph).
- "summary": the passage, then "summarize it in its own words": an answer reusing its phrases.
- "chat": a conversation over the passage: two turns in which the assistant quoted a sentence each (the
  quotes are the passage's), then "repeat both quotes together": an answer reusing earlier turns
  (`reference`: the two quotes).
- "continuation": raw text of exactly `context` tokens to continue (no chat template): the control.
The chat workloads use the tokenizer's chat template (SmolLM2's for the built-in model; a tokenizer without
one gets "User:"/"Assistant:" lines) and unwrap the novels' hard line breaks inside paragraphs, so a quote
in an answer tokenizes as it does in the passage.

Held-out splits: passages of split "tune" come from the first half of each book, those of split "eval" from
the second half (`magicdec.bench.corpora.corpus` REGIONS "head" and "tail"), so tuning (thresholds, n-gram sizes)
never sees a reported passage. A workload depends only on the tokenizer, corpus, name, context, n, seed and
split: rerun `build_workload("qa", LLM().tokenizer, load_austen(), 4096, 8, seed=0, split="eval")` to get
the same prompts. Chat prompts are at most `context` tokens (whole paragraphs: usually within a paragraph's
length of it); continuation prompts are exactly `context` tokens. Leave room for the answer: the built-in
model's context is 8192 positions, prompt and output together.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from magicdec.bench.corpora.corpus import Corpus, CorpusError, make_prompts, region_bounds

WORKLOADS = ("qa", "revise", "summary", "chat", "continuation")
SPLITS = {"tune": "head", "eval": "tail"}
COPY_HEAVY = ("qa", "revise", "summary", "chat")
# a sentence: from a capital (or an opening quote) to its end mark, "Mr." and the like not ending it
_SENTENCE = re.compile(r"[“\"‘']?[A-Z](?:[^.!?]|(?<=Mr)\.|(?<=Mrs)\.|(?<=Dr)\.|(?<=St)\.)*[.!?]+[”’\"']?")
_WORD = re.compile(r"[A-Za-z][a-z]{4,}")


@dataclass(frozen=True, slots=True)
class WorkloadPrompt:
    """One prompt: its token ids; the passage it was cut from (as the prompt shows it); the passage's
    text that a copying answer reproduces (`reference`: empty for summary and continuation); where the
    passage came from (document name and character offset in the document)."""

    workload: str
    tokens: list[int]
    passage: str
    reference: str
    document: str
    offset: int


def _ids(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(out, "ids", out))


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.encode_chat(messages))
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return _ids(tokenizer, text)


@functools.lru_cache(maxsize=16)
def _book(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Paragraphs and their character offsets in the document."""
    paras, offsets, pos = [], [], 0
    for raw in text.split("\n\n"):
        if raw.strip():
            paras.append(" ".join(line.strip() for line in raw.splitlines()))
            offsets.append(pos)
        pos += len(raw) + 2
    return tuple(paras), tuple(offsets)


def sentences(paragraph: str) -> list[str]:
    """The paragraph's sentences, exactly as they appear in it."""
    return [m.group(0).strip() for m in _SENTENCE.finditer(paragraph)]


def _keyed_sentence(passage: str, paragraphs: list[str], rng: random.Random,
                    avoid: set[str] | frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """A sentence of 12–60 words and a word of it that occurs nowhere else in the passage."""
    counts = Counter(_WORD.findall(passage))
    pool = [s for p in paragraphs for s in sentences(p) if 12 <= len(s.split()) <= 60 and s not in avoid]
    rng.shuffle(pool)
    for s in pool:
        unique = sorted({w for w in _WORD.findall(s) if counts[w] == 1})
        if unique and passage.count(s) == 1:
            return s, rng.choice(unique)
    return None


def _passage(paras: tuple[str, ...], start: int, budget_chars: int) -> list[str]:
    out, size = [], 0
    for p in paras[start:]:
        if size + len(p) > budget_chars and out:
            break
        out.append(p)
        size += len(p) + 2
    return out


def _messages(name: str, paragraphs: list[str], rng: random.Random) -> tuple[list[dict[str, str]], str] | None:
    passage = "\n\n".join(paragraphs)
    if name == "qa":
        found = _keyed_sentence(passage, paragraphs, rng)
        if found is None:
            return None
        sentence, word = found
        ask = (f'In the passage above, find the sentence that mentions "{word}" and quote it exactly, word for '
               "word.")
        return [{"role": "user", "content": f"{passage}\n\n{ask}"}], sentence
    if name == "revise":
        long = [p for p in paragraphs if len(p.split()) >= 40]
        if not long:
            return None
        para = rng.choice(long)
        ask = ("Revise the following paragraph of the passage above for a modern reader. Keep its wording "
               f"wherever you can; change only old-fashioned spelling and punctuation.\n\n{para}")
        return [{"role": "user", "content": f"{passage}\n\n{ask}"}], para
    if name == "summary":
        ask = "Summarize the passage above in a few sentences, reusing its own words where you can."
        return [{"role": "user", "content": f"{passage}\n\n{ask}"}], ""
    if name == "chat":
        first = _keyed_sentence(passage, paragraphs, rng)
        second = first and _keyed_sentence(passage, paragraphs, rng, {first[0]})
        if not first or not second:
            return None
        (s1, w1), (s2, w2) = first, second
        return [
            {"role": "user", "content": f'{passage}\n\nQuote the sentence of the passage above that mentions "{w1}".'},
            {"role": "assistant", "content": s1},
            {"role": "user", "content": f'Now quote the sentence that mentions "{w2}".'},
            {"role": "assistant", "content": s2},
            {"role": "user", "content": "Repeat both quotes together, the first one then the second."},
        ], f"{s1} {s2}"
    raise CorpusError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")


def build_workload(name: str, tokenizer: Any, corpus: Corpus, context: int, n: int, seed: int = 0,
                   split: str = "eval") -> list[WorkloadPrompt]:
    """`n` prompts of workload `name` (see the module docstring), each at most `context` tokens (continuation:
    exactly), from passages of `split` ("tune" or "eval")."""
    if name not in WORKLOADS:
        raise CorpusError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; use 'tune' (for tuning) or 'eval' (for reported figures)")
    if context < 256 or n < 1:
        raise CorpusError(f"a workload needs n ≥ 1 prompts of context ≥ 256 tokens, got n={n}, context={context}")
    region = SPLITS[split]
    if name == "continuation":
        prompts = make_prompts(tokenizer, corpus, n, context, seed, region=region)
        return [WorkloadPrompt(name, p, "", "", "", -1) for p in prompts]
    lo_frac, hi_frac = region_bounds(region)
    rng = random.Random(f"{name}/{seed}/{split}/{context}")
    docs = list(corpus.documents)
    rng.shuffle(docs)
    out: list[WorkloadPrompt] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n:
            raise CorpusError(f"could not cut {n} {name!r} prompts of ≤ {context} tokens from corpus {corpus.name!r} "
                              f"in split {split!r}; use fewer or longer prompts")
        doc = docs[(tries - 1) % len(docs)]
        paras, offsets = _book(doc.text)
        lo = next((i for i, o in enumerate(offsets) if o >= lo_frac * len(doc.text)), len(paras))
        hi = next((i for i, o in enumerate(offsets) if o >= hi_frac * len(doc.text)), len(paras))
        budget = context * 4  # characters: English prose runs about 4 per token; trimmed below
        if hi - lo < 4:
            continue
        start = rng.randrange(lo, hi)
        chosen = _passage(paras[:hi], start, budget)
        built = _messages(name, chosen, random.Random(rng.random()))
        while built is not None:
            tokens = _chat(tokenizer, built[0])
            if len(tokens) <= context:
                break
            over = len(tokens) - context
            cut = max(1, min(len(chosen) - 1, over * len(chosen) // max(len(tokens), 1)))
            chosen = chosen[:-cut] if len(chosen) > 1 else []
            built = _messages(name, chosen, random.Random(rng.random())) if chosen else None
        if built is None or len(tokens) < context // 2:
            continue
        passage = "\n\n".join(chosen)
        out.append(WorkloadPrompt(name, tokens, passage, built[1], doc.name, offsets[start]))
    return out
