"""Text corpora and the prompts cut from them.

This file owns `Document`/`Corpus`, `load_corpus` (a corpus from a name, file or directory) and
`make_prompts` (a batch of token-exact prompts from a corpus). The Austen corpus itself lives in
`magicdec.bench.corpora.austen`.

Holdout: ``make_prompts(..., region=...)`` restricts passages to a fraction of each document's tokens.
``"head"`` is the first half, ``"tail"`` the second half, ``"any"`` the whole document, and a pair
``(start, end)`` of fractions any other window. Passages cut with ``region="head"`` and with
``region="tail"`` never share a token, so one can tune on the one and evaluate on the other. To hold
out whole books instead, use `Corpus.subset`.
"""

from __future__ import annotations

import inspect
import json
import math
import operator
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

TEXT_SUFFIXES = (".txt", ".jsonl")
NAMED_CORPORA = ("austen", "pg19")
PG19_DATASET = "emozilla/pg19"  # a Parquet copy of deepmind/pg19 (fields short_book_title, text)
HOLDOUT_SPLIT = 0.5
REGIONS: dict[str, tuple[float, float]] = {
    "any": (0.0, 1.0),
    "head": (0.0, HOLDOUT_SPLIT),
    "tail": (HOLDOUT_SPLIT, 1.0),
}
Region = str | tuple[float, float]


class CorpusError(ValueError):
    """A corpus that cannot be found, read or cut into the prompts asked for; the message says why."""


class Tokenizer(Protocol):
    """What `make_prompts` needs. It passes ``add_special_tokens=False`` to an ``encode`` that takes that
    parameter (`magicdec.loading.tokenizer.Tokenizer`, Hugging Face tokenizers); any other ``encode``
    must add no special tokens (no BOS) itself. An ``encode`` returning a `tokenizers.Encoding` works."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True, slots=True)
class Corpus:
    name: str
    documents: tuple[Document, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "documents", tuple(self.documents))

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    @property
    def names(self) -> list[str]:
        return [doc.name for doc in self.documents]

    def subset(self, names: Iterable[str]) -> Corpus:
        """The documents with these names, in this corpus's order (e.g. hold out whole books)."""
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown:
            raise CorpusError(f"corpus {self.name!r} has no document {sorted(unknown)}; it has {self.names}")
        return Corpus(self.name, tuple(doc for doc in self.documents if doc.name in wanted))


# --- loading -------------------------------------------------------------------------------------------


def load_file(path: Path, field: str) -> list[Document]:
    if path.suffix not in TEXT_SUFFIXES:
        raise CorpusError(
            f"{path}: unsupported file type {path.suffix!r}; expected {' or '.join(TEXT_SUFFIXES)}"
        )
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read {path} as UTF-8 text: {exc}") from exc
    if path.suffix == ".txt":
        return [Document(path.name, content)]
    documents = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}, line {lineno}: invalid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise CorpusError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            raise CorpusError(
                f"{path}, line {lineno}: no field {field!r}; available keys: {', '.join(map(repr, record))}"
            )
        if not isinstance(record[field], str):
            raise CorpusError(
                f"{path}, line {lineno}: field {field!r} is {type(record[field]).__name__}, not text"
            )
        documents.append(Document(f"{path.name}:{lineno}", record[field]))
    return documents


def load_pg19(split: str = "test", dataset: str = PG19_DATASET) -> Corpus:
    """PG-19 books of one split from the Hugging Face Hub; needs ``datasets`` and network access."""
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError(
            "corpus 'pg19' needs the `datasets` package (pip install datasets) and access to the Hugging "
            "Face Hub; offline, use 'austen' or a local .txt/.jsonl file"
        ) from exc
    try:
        rows: Any = datasets.load_dataset(dataset, split=split)
    except Exception as exc:  # network, auth, a missing split: all reported the same way
        raise CorpusError(
            f"cannot load PG-19 ({dataset}, split {split!r}) from the Hugging Face Hub: {exc}"
        ) from exc
    documents = tuple(
        Document(str(row.get("short_book_title") or f"{split}:{i}"), row["text"])
        for i, row in enumerate(rows)
    )
    return Corpus(f"pg19:{split}", documents)


# --- prompts -------------------------------------------------------------------------------------------


def region_bounds(region: Region) -> tuple[float, float]:
    if isinstance(region, str):
        if region not in REGIONS:
            raise CorpusError(
                f"unknown region {region!r}; use one of {', '.join(REGIONS)} or (start, end) fractions"
            )
        return REGIONS[region]
    start, end = region
    if not 0.0 <= start < end <= 1.0:
        raise CorpusError(f"region fractions must satisfy 0 <= start < end <= 1, got {region!r}")
    return float(start), float(end)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # Tokenizers that add special tokens by default (magicdec.loading, Hugging Face) take this flag.
    try:
        params = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    kwargs = {"add_special_tokens": False} if "add_special_tokens" in params else {}
    ids: Any = tokenizer.encode(text, **kwargs)
    return list(getattr(ids, "ids", ids))  # also accept a `tokenizers.Encoding`


def make_prompts(
    tokenizer: Tokenizer,
    corpus: Corpus,
    batch: int | None = None,
    context: int | None = None,
    seed: int = 0,
    *,
    lengths: Sequence[int] | None = None,
    region: Region = "any",
) -> list[list[int]]:
    """Cut prompts of exact token lengths from `corpus`: `batch` prompts of `context` tokens each, or one
    prompt per entry of `lengths` (a ragged batch; `batch`, if given, must equal ``len(lengths)``).

    Sequences go round-robin over the documents long enough for them (the least-used first, the
    rotation's start drawn from `seed`), each at a random offset inside `region` (see the module
    docstring); two sequences of the same length from the same document never share an offset. The
    result depends only on the tokenizer, corpus, lengths, region and seed. Each document is tokenized
    once per call.
    """
    if lengths is None:
        if batch is None or context is None:
            raise CorpusError("give `batch` and `context`, or `lengths`")
        lengths = [context] * batch
    elif context is not None or (batch is not None and batch != len(lengths)):
        raise CorpusError(
            f"`lengths` ({len(lengths)} entries) conflicts with batch={batch}, context={context}"
        )
    try:
        lengths = [operator.index(n) for n in lengths]  # ints, numpy ints; not floats
    except TypeError as exc:
        raise CorpusError(f"prompt lengths must be integers, got {list(lengths)}") from exc
    if not lengths or min(lengths) <= 0:
        raise CorpusError(f"need at least one prompt and positive lengths, got {lengths}")
    start, end = region_bounds(region)
    if not corpus.documents:
        raise CorpusError(f"corpus {corpus.name!r} has no documents")

    windows = []  # per document: its tokens and the [lo, hi) token window of the region
    for doc in corpus.documents:
        tokens = _encode(tokenizer, doc.text)
        windows.append((tokens, math.floor(start * len(tokens)), math.floor(end * len(tokens))))

    rng = random.Random(seed)
    rotation = rng.randrange(len(windows))
    uses = [0] * len(windows)
    taken: dict[tuple[int, int], set[int]] = {}  # (document, length) -> offsets already used
    prompts = []
    for n in lengths:
        order = sorted(range(len(windows)), key=lambda j: (uses[j], (j - rotation) % len(windows)))
        candidates = [j for j in order if windows[j][2] - windows[j][1] >= n]
        if not candidates:
            longest = max(range(len(windows)), key=lambda j: windows[j][2] - windows[j][1])
            raise CorpusError(
                f"no document in corpus {corpus.name!r} has {n} tokens in region {region!r}: the longest, "
                f"{corpus.documents[longest].name!r}, has {windows[longest][2] - windows[longest][1]} "
                f"(of {len(windows[longest][0])}); use shorter prompts, region='any', or a longer corpus"
            )
        for j in candidates:
            tokens, lo, hi = windows[j]
            used = taken.setdefault((j, n), set())
            choices = hi - lo - n + 1  # distinct offsets in the window
            if len(used) >= choices:
                continue
            if 2 * len(used) <= choices:  # rejection sampling: at most half the offsets are used
                offset = rng.randrange(lo, lo + choices)
                while offset in used:
                    offset = rng.randrange(lo, lo + choices)
            else:  # few offsets left (choices < 2 * batch): pick among them
                offset = rng.choice([o for o in range(lo, lo + choices) if o not in used])
            used.add(offset)
            uses[j] += 1
            prompts.append(tokens[offset : offset + n])
            break
        else:
            raise CorpusError(
                f"corpus {corpus.name!r} cannot give {lengths.count(n)} distinct passages of {n} tokens "
                f"in region {region!r}; use fewer or shorter prompts"
            )
    return prompts
