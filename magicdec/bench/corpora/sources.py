"""Where a corpus comes from: a name ("austen", "pg19") or local text/JSONL files."""

from __future__ import annotations

from pathlib import Path

from magicdec.bench.corpora.austen import load_austen
from magicdec.bench.corpora.corpus import NAMED_CORPORA, TEXT_SUFFIXES, Corpus, CorpusError, load_file, load_pg19


def load_corpus(spec: str | Path, jsonl_field: str = "text") -> Corpus:
    """A corpus from `spec`:

    - ``"austen"``: the six Jane Austen novels (`magicdec.bench.corpora.austen.load_austen`);
    - ``"pg19"`` or ``"pg19:SPLIT"``: PG-19 (default split ``test``) through the ``datasets`` package;
    - a ``.txt`` file (one document), a ``.jsonl`` file (one document per non-blank line, the text in
      field `jsonl_field`), or a directory (every ``.txt``/``.jsonl`` file directly in it, sorted).
    """
    text = str(spec)
    if text == "austen":
        return load_austen()
    if text == "pg19" or text.startswith("pg19:"):
        return load_pg19(text.partition(":")[2] or "test")
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"directory {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        documents = [doc for file in files for doc in load_file(file, jsonl_field)]
    elif path.is_file():
        documents = load_file(path, jsonl_field)
    else:
        raise CorpusError(
            f"no such corpus {text!r}: not a known name ({', '.join(NAMED_CORPORA)}) "
            "nor an existing file or directory"
        )
    if not documents:
        raise CorpusError(f"corpus {path} has no documents")
    return Corpus(path.resolve().name or str(path), tuple(documents))
