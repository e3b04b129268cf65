"""Corpora for prompts: the Jane Austen novels, local text/JSONL files, PG-19; and `make_prompts`.

`corpus.py` owns the data types, loading and prompt cutting; `austen.py` fetches and parses the Austen
corpus; `paths.py` says where downloaded data lives (``$MAGICDEC_HOME``, default ``~/.cache/magicdec``).
"""

from magicdec.data.austen import austen_dir, fetch_austen, load_austen
from magicdec.data.corpus import Corpus, CorpusError, Document, load_corpus, make_prompts
from magicdec.data.paths import corpora_dir, magicdec_home

__all__ = [
    "Corpus",
    "CorpusError",
    "Document",
    "austen_dir",
    "corpora_dir",
    "fetch_austen",
    "load_austen",
    "load_corpus",
    "magicdec_home",
    "make_prompts",
]
