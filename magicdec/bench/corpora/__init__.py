"""Corpora for prompts (the lab's, never imported by the product): the Jane Austen novels, local text/JSONL
files, PG-19; and `make_prompts`.

`corpus.py` owns the data types, file loading and prompt cutting; `sources.py` resolves a corpus name;
`austen.py` fetches and parses the Austen corpus into `magicdec.home.corpora_dir()`.
"""

from magicdec.bench.corpora.austen import austen_dir, fetch_austen, load_austen
from magicdec.bench.corpora.corpus import Corpus, CorpusError, Document, make_prompts
from magicdec.bench.corpora.sources import load_corpus

__all__ = [
    "Corpus",
    "CorpusError",
    "Document",
    "austen_dir",
    "fetch_austen",
    "load_austen",
    "load_corpus",
    "make_prompts",
]
